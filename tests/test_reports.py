"""HTML reports: rendered from a tiny real dissection and from the contract fixture."""
from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from broden.errors import InputError
from dissect.cli import main
from reports.psi import parse_psi_units, unit_psi
from reports.render import render_report
from reports.results import read_run
from reports.thumbnails import OUTLINE_COLOR, activation_masks, compose_tiles, scale_masks
from results_fixture import make_dataset, make_results_dir


class Tags(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def parse(path: Path) -> list[tuple[str, dict[str, str]]]:
    parser = Tags()
    parser.feed(path.read_text())
    return parser.tags


def cells(path: Path) -> dict[tuple[str, str, str], str]:
    """(layer, metric, category) -> text of the index page's data-metric cells."""
    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.layer = ""
            self.key: tuple[str, str, str] | None = None
            self.found: dict[tuple[str, str, str], str] = {}

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and "data-layer" in a:
                self.layer = a["data-layer"]
            if tag == "td" and "data-metric" in a:
                self.key = (self.layer, a["data-metric"], a.get("data-category") or "")

        def handle_data(self, data):
            if self.key is not None:
                self.found[self.key] = data.strip()
                self.key = None

    parser = Cells()
    parser.feed(path.read_text())
    return parser.found


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dissect run` on a 4+6-unit tiny_cnn checkpoint over 6 images, then `dissect report`."""
    from dissect.checkpoint import make_checkpoint, save_checkpoint
    from cgl_train.models import build_model

    root = tmp_path_factory.mktemp("real")
    dataset = make_dataset(root / "broden", seed=0)
    torch.manual_seed(0)
    kwargs = {"num_classes": 2, "input_size": 32, "width1": 4, "width2": 6}
    model = build_model("tiny_cnn", **kwargs)
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(),
                           groups={"conv2": {"groups": 2, "free": 0, "channels": 6}},
                           normalization={"mean": [0.5] * 3, "std": [0.25] * 3}, input_size=32,
                           metrics={"val_acc": 0.75})
    save_checkpoint(ckpt, root / "model.pth")
    out = root / "results"
    assert main(["run", str(root / "model.pth"), "--dataset", str(dataset), "--out", str(out), "--quiet",
                 "--device", "cpu", "--top-k", "3", "--layers", "conv1", "conv2"]) == 0
    assert main(["report", str(out), "--psi-units", "conv2:0,3"]) == 0
    return out


def test_unit_cards_equal_units_json(real_run: Path) -> None:
    summary = json.loads((real_run / "summary.json").read_text())
    threshold = summary["options"]["iou_threshold"]
    for layer in summary["layers"]:
        units = json.loads((real_run / layer["dir"] / "units.json").read_text())["units"]
        units.sort(key=lambda u: (-u["iou"], u["unit"]))  # the page lists units by IoU, highest first
        cards = [a for tag, a in parse(real_run / "report" / f"{layer['name']}.html")
                 if "unit-card" in a.get("class", "").split()]
        assert [int(c["data-unit"]) for c in cards] == [u["unit"] for u in units]
        for card, unit in zip(cards, units):
            assert float(card["data-iou"]) == unit["iou"]  # exact: written with repr
            assert card["data-label"] == unit["label"]
            assert card["data-category"] == (unit["category"] or "")
            assert card["data-detector"] == ("1" if unit["iou"] >= threshold else "0")
        assert sum(c["data-detector"] == "1" for c in cards) == layer["detectors"]


def test_index_numbers_equal_summary(real_run: Path) -> None:
    summary = json.loads((real_run / "summary.json").read_text())
    found = cells(real_run / "report" / "index.html")
    for layer in summary["layers"]:
        name = layer["name"]
        assert found[(name, "num_units", "")] == str(layer["num_units"])
        assert found[(name, "detectors", "")] == str(layer["detectors"])
        for cat in summary["dataset"]["categories"]:
            assert found[(name, "detectors", cat)] == str(layer["detectors_per_category"].get(cat, 0))
            for d in ("paper", "top_label"):
                assert found[(name, f"unique_{d}", cat)] == \
                    str(layer["unique_detectors"][d]["per_category"].get(cat, 0))
        for d in ("paper", "top_label"):
            assert found[(name, f"unique_{d}_total", "")] == str(layer["unique_detectors"][d]["total"])
            assert float(found[(name, f"rud_{d}", "")]) == pytest.approx(layer["rud"][d], abs=5e-4)
    index = (real_run / "report" / "index.html").read_text()
    assert 'data-metric="val_acc" data-value="0.75"' in index
    for d, value in summary["rud_last_two"].items():
        assert f'data-definition="{d}" data-value="{value!r}"' in index


def test_every_reference_exists_and_nothing_leaves_the_page(real_run: Path) -> None:
    report = real_run / "report"
    pages = sorted(report.glob("*.html"))
    assert {p.name for p in pages} == {"index.html", "conv1.html", "conv2.html"}
    refs = 0
    for page in pages:
        for tag, attrs in parse(page):
            for key in ("src", "href"):
                ref = attrs.get(key)
                if not ref or ref.startswith("#"):
                    continue
                assert "://" not in ref and not ref.startswith("/"), (page, ref)
                assert (page.parent / ref.split("#")[0]).is_file(), (page, ref)
                refs += 1
    assert refs > 20  # pages, CSS, JS, figures and one thumbnail strip per unit
    files = [p for p in report.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".html", ".css", ".js", ".json", ".png", ".jpg"}
    for path in files:  # binary files too: PNG metadata must not carry a URL either
        data = path.read_bytes()
        assert b"http://" not in data and b"https://" not in data, path


def test_psi_figures_and_groups(real_run: Path) -> None:
    summary = json.loads((real_run / "summary.json").read_text())
    page = real_run / "report" / "conv2.html"
    tags = parse(page)
    psi = [a for tag, a in tags if tag == "figure" and "psi" in a.get("class", "")]
    assert [int(a["data-unit"]) for a in psi] == [0, 3]
    assert [a["data-formula"] for a in psi] == ["std", "std"]  # tiny_cnn has no batch-norm
    for unit in (0, 3):
        assert (real_run / "report" / "figures" / f"psi-conv2-unit{unit:04d}.png").is_file()
    groups = next(l for l in summary["layers"] if l["name"] == "conv2")["groups"]
    rows = [a for tag, a in tags if tag == "tr" and "data-group" in a]
    assert [int(r["data-group"]) for r in rows] == [g["index"] for g in groups]
    assert [float(r["data-relevance"]) for r in rows] == [g["relevance"] for g in groups]
    assert json.loads((real_run / "report" / "report.json").read_text())["psi_units"] == {"conv2": [0, 3]}


def _naive_bilinear(m: np.ndarray, H: int, W: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling, written out pixel by pixel."""
    h, w = m.shape
    out = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            y = max((i + 0.5) * h / H - 0.5, 0.0)
            x = max((j + 0.5) * w / W - 0.5, 0.0)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            wy, wx = y - y0, x - x0
            out[i, j] = ((1 - wy) * (1 - wx) * m[y0, x0] + (1 - wy) * wx * m[y0, x1]
                         + wy * (1 - wx) * m[y1, x0] + wy * wx * m[y1, x1])
    return out


def _naive_nearest(mask: np.ndarray, H: int, W: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres, pixel by pixel."""
    h, w = mask.shape
    out = np.zeros((H, W), dtype=bool)
    for i in range(H):
        for j in range(W):
            out[i, j] = mask[min(int((i + 0.5) * h / H), h - 1), min(int((j + 0.5) * w / W), w - 1)]
    return out


def test_thumbnail_masks_are_label_size_masks_scaled_nearest() -> None:
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, size=(2, 3, 4)).astype(np.float32)
    thresholds = np.array([0.4, 0.6], dtype=np.float32)
    label_size, thumb = (9, 10), (27, 25)  # 3x up in height, 2.5x in width
    masks = activation_masks(torch.from_numpy(maps), torch.from_numpy(thresholds), label_size).numpy()
    assert masks.shape == (2, 9, 10)
    shown = scale_masks(torch.from_numpy(masks), thumb).numpy()
    for n in range(2):
        up = _naive_bilinear(maps[n].astype(np.float64), *label_size)
        away = np.abs(up - thresholds[n]) > 1e-5  # float32 rounding may flip exact ties only
        assert away.sum() > 60
        assert np.array_equal(masks[n][away], (up > thresholds[n])[away])
        assert np.array_equal(shown[n], _naive_nearest(masks[n], *thumb))


def test_single_pixel_peak_shows_the_mask_the_dissection_counted() -> None:
    # a 4x4 map with one peak, labels at 4x4 (as the tally sees it), the image at 8x8: at label size
    # the peak stays 1.0 > 0.8, while a 2x bilinear upscale to the image would lower it to 0.5625
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0
    masks = activation_masks(maps, torch.tensor([0.8]), (4, 4))
    assert masks.sum() == 1 and masks[0, 1, 2]
    assert not activation_masks(maps, torch.tensor([0.8]), (8, 8)).any()  # what image size would show
    image = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    tile = compose_tiles(image, masks, height=8, dim=0.2)[0]  # (8, 8, 3)
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:4, 4:6] = True  # the one label pixel covers 2x2 image pixels
    lit = np.all(tile == np.array(OUTLINE_COLOR, dtype=np.uint8), axis=-1)  # all of a 2x2 mask is outline
    assert np.array_equal(lit, expected)
    assert np.all(tile[~expected] == 40)  # 200 dimmed to 20%


def test_compose_tiles_dims_and_outlines() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(1, 3, 8, 8), dtype=np.uint8)
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 2:6, 0:5] = True
    tile = compose_tiles(torch.from_numpy(image), torch.from_numpy(mask), height=8, dim=0.2)[0]  # (8, 8, 3)
    img = image[0].transpose(1, 2, 0).astype(np.float64)
    for i in range(8):
        for j in range(8):
            if not mask[0, i, j]:
                expected = np.round(img[i, j] * 0.2)
            else:
                neighbours = [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)]
                edge = any(not (0 <= a < 8 and 0 <= b < 8) or not mask[0, a, b] for a, b in neighbours)
                expected = np.array(OUTLINE_COLOR) if edge else img[i, j]
            assert np.abs(tile[i, j].astype(np.float64) - expected).max() <= 1, (i, j)


def test_strips_follow_threshold_and_are_reused(tmp_path: Path) -> None:
    results = make_results_dir(tmp_path, seed=1)
    acts_path = results / "conv1" / "top_activations.npy"
    acts = np.load(acts_path)
    acts[0] = 0.0   # below every threshold (0.3..0.7): the whole tile dimmed
    acts[1] = 10.0  # above: nothing dimmed
    np.save(acts_path, acts)
    render_report(results, thumb_height=32)
    units = json.loads((results / "conv1" / "units.json").read_text())["units"]
    strips = {}
    for tag, a in parse(results / "report" / "conv1.html"):
        if tag == "img" and a.get("class") == "strip":
            strips[int(a["alt"].split()[-1])] = a["src"]
    assert sorted(strips) == [u["unit"] for u in units]
    k = len(units[0]["top_images"])
    first = np.asarray(Image.open(tmp_path / "broden" / "images" /
                                  units[0]["top_images"][0]["image"]).convert("RGB")).astype(np.float64)
    dark = np.asarray(Image.open(results / "report" / strips[0]).convert("RGB")).astype(np.float64)
    bright = np.asarray(Image.open(results / "report" / strips[1]).convert("RGB")).astype(np.float64)
    assert dark.shape == (32, k * 32 + (k - 1) * 2, 3)  # 32x32 images at height 32, 2 px gaps
    assert abs(dark[:, :32].mean() - 0.2 * first.mean()) < 4  # JPEG tolerance
    first_bright = np.asarray(Image.open(tmp_path / "broden" / "images" /
                                         units[1]["top_images"][0]["image"]).convert("RGB")).astype(np.float64)
    assert np.abs(bright[3:29, 3:29] - first_bright[3:29, 3:29]).mean() < 4  # inside the outline: untouched

    before = {p.name: p.stat().st_mtime_ns for p in (results / "report" / "thumbs" / "conv1").iterdir()}
    render_report(results, thumb_height=32)
    after = {p.name: p.stat().st_mtime_ns for p in (results / "report" / "thumbs" / "conv1").iterdir()}
    assert after == before  # reused, not rewritten

    acts[2] = 10.0  # unit 2's saved maps change: only its strip is redrawn
    np.save(acts_path, acts)
    render_report(results, thumb_height=32)
    again = {p.name: p.stat().st_mtime_ns for p in (results / "report" / "thumbs" / "conv1").iterdir()}
    changed = set(again) ^ set(before)
    assert len(changed) == 2 and all(name.startswith("unit0002-") for name in changed)
    assert {n: t for n, t in again.items() if not n.startswith("unit0002-")} == \
        {n: t for n, t in before.items() if not n.startswith("unit0002-")}


def test_strips_draw_the_mask_at_label_size(tmp_path: Path) -> None:
    # fixture: conv1 maps 8x8, labels 16x16, images 32x32; a one-pixel peak at map (3, 3)
    results = make_results_dir(tmp_path, seed=6)
    acts = np.load(results / "conv1" / "top_activations.npy")
    thresholds = np.load(results / "conv1" / "thresholds.npy")
    acts[3:5] = 0.0
    acts[3:5, :, 3, 3] = 1.0
    thresholds[3], thresholds[4] = 0.7, 0.5
    np.save(results / "conv1" / "top_activations.npy", acts)
    np.save(results / "conv1" / "thresholds.npy", thresholds)
    render_report(results, thumb_height=32)
    strips = {int(a["alt"].split()[-1]): a["src"] for tag, a in parse(results / "report" / "conv1.html")
              if tag == "img" and a.get("class") == "strip"}
    # unit 3: at label size the peak is 0.75 * 0.75 = 0.5625 < 0.7, so nothing is active (at image
    # size, 4x, it would be 0.875^2 = 0.77 > 0.7 over image pixels 13..14)
    dark = np.asarray(Image.open(results / "report" / strips[3]).convert("RGB")).astype(np.float64)
    assert dark[:, :32].max() < 0.2 * 255 + 40  # JPEG ringing; the outline would be 255
    # unit 4: label pixels 6..7 (0.5625 > 0.5) are the mask, i.e. image pixels 12..15, all but the
    # 2x2 centre outlined
    lit = np.asarray(Image.open(results / "report" / strips[4]).convert("RGB")).astype(np.float64)[:, :32]
    ring = np.zeros((32, 32), dtype=bool)
    ring[12:16, 12:16] = True
    ring[13:15, 13:15] = False
    assert np.abs(lit[ring] - np.array(OUTLINE_COLOR)).mean() < 25
    outside = np.ones((32, 32), dtype=bool)
    outside[11:17, 11:17] = False
    assert lit[outside].max() < 0.2 * 255 + 40  # JPEG ringing; the outline would be 255


def test_report_renders_without_the_dataset(tmp_path: Path) -> None:
    results = make_results_dir(tmp_path, seed=2)
    shutil.rmtree(tmp_path / "broden")
    index = render_report(results)
    page = (results / "report" / "conv1.html").read_text()
    assert 'id="dataset-note"' in page and str(tmp_path / "broden" / "images") in page
    assert 'class="strip"' not in page
    assert 'id="dataset-note"' in index.read_text()
    assert not (results / "report" / "thumbs" / "conv1").exists() or \
        not any((results / "report" / "thumbs" / "conv1").iterdir())


def test_bar_chart_counts_and_bubble_plot(tmp_path: Path) -> None:
    from reports.figures import detector_counts
    from reports.results import detector_rule

    results = make_results_dir(tmp_path, seed=4)
    run = read_run(results)
    rule = detector_rule(run.summary["options"])
    for layer in run.layers:
        counts = detector_counts(layer.units["units"], run.summary["dataset"]["categories"], rule)
        assert sum(n for _, _, n in counts) == layer.meta["detectors"]
        for cat, n in layer.meta["detectors_per_category"].items():
            assert sum(m for c, _, m in counts if c == cat) == n
        assert [c for c, _, _ in counts] == sorted((c for c, _, _ in counts),
                                                   key=run.summary["dataset"]["categories"].index)
    render_report(results)
    index = (results / "report" / "index.html").read_text()
    assert 'src="figures/concept-groups.png"' in index  # the fixture's conv2 groups are aligned
    for name in ("conv1", "conv2"):
        png = results / "report" / "figures" / f"{name}-detectors.png"
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = make_results_dir(tmp_path, seed=5)
    assert main(["report", str(results), "--top-k", "4"]) == 2
    assert "--top-k 4" in capsys.readouterr().err
    assert main(["report", str(results), "--psi-units", "conv2:99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["report", str(results), "--psi-units", "nolayer:1"]) == 2
    assert "nolayer" in capsys.readouterr().err
    summary = json.loads((results / "summary.json").read_text())
    summary["format"] = "something-else"
    (results / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "format" in err
    assert not (results / "report" / "index.html").exists()
    with pytest.raises(InputError, match="expected LAYER:UNIT"):
        parse_psi_units(["conv2"])


def test_parse_psi_units() -> None:
    assert parse_psi_units(["conv2:5,17", "features.10:3", "conv2:5,2"]) == \
        {"conv2": [5, 17, 2], "features.10": [3]}


def test_unit_psi_matches_the_formula() -> None:
    rng = np.random.default_rng(3)
    pre = rng.normal(size=(3, 4, 5))
    s = math.sqrt(sum((v - pre.mean()) ** 2 for v in pre.ravel()) / pre.size)
    for p1, p2 in ((1.0, 0.0), (2.0, -0.5)):
        expected = 1 / (1 + np.exp(-(p1 * pre / (s + 1e-5) + p2)))
        got = unit_psi(torch.from_numpy(pre), p1, p2).numpy()
        assert np.allclose(got, expected, atol=1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _top_images(results: Path, layer: str, unit: int) -> tuple[list[str], np.ndarray]:
    """The unit's top image paths and the images as float64 (k, 3, H, W) on the 0..1 scale."""
    units = json.loads((results / layer / "units.json").read_text())["units"]
    paths = [t["image"] for t in units[unit]["top_images"]]
    root = results.parent / "broden" / "images"
    imgs = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in paths]).transpose(0, 3, 1, 2)
    return paths, imgs.astype(np.float64) / 255.0


def _pointwise_conv(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """One output channel of a 1x1 conv: x (k, C, H, W), w (C,) -> (k, H, W), summed channel by channel."""
    out = np.full(x[:, 0].shape, b, dtype=np.float64)
    for c in range(x.shape[1]):
        out += w[c] * x[:, c]
    return out


def _layer_psi(results: Path, layer: str, unit: int, p1: float, p2: float) -> tuple[str, np.ndarray]:
    from dissect.models import load_model
    from reports.psi import layer_psi

    summary = json.loads((results / "summary.json").read_text())
    loaded = load_model(summary["model"]["source"], trust_pickle=True)
    paths, _ = _top_images(results, layer, unit)
    root = results.parent / "broden" / "images"
    images = {p: np.asarray(Image.open(root / p).convert("RGB")) for p in paths}
    formula, _, psi = layer_psi(loaded.module, layer, images, {unit: paths}, summary["model"]["normalization"],
                                None, p1, p2)
    return formula, psi[unit].numpy()


def test_psi_without_batch_norm_matches_a_hand_computation(tmp_path: Path) -> None:
    """tiny_cnn checkpoint whose conv1 only has centre taps: a = w . x + b per pixel, S = std over the images."""
    from dissect.checkpoint import make_checkpoint, save_checkpoint
    from cgl_train.models import build_model

    kwargs = {"num_classes": 2, "input_size": 32, "width1": 6, "width2": 8}
    model = build_model("tiny_cnn", **kwargs)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, 3))
    bias = rng.normal(size=6)
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[:, :, 1, 1] = torch.from_numpy(w)
        model.conv1.bias.copy_(torch.from_numpy(bias))
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(), groups={},
                           normalization={"mean": [0.0] * 3, "std": [1.0] * 3}, input_size=32)
    save_checkpoint(ckpt, tmp_path / "plain.pth")
    results = make_results_dir(tmp_path, seed=8, model_source=str(tmp_path / "plain.pth"),
                               model_kind="checkpoint")
    unit, p1, p2 = 2, 2.0, -0.5
    formula, got = _layer_psi(results, "conv1", unit, p1, p2)
    _, x = _top_images(results, "conv1", unit)
    a = _pointwise_conv(x, w[unit], bias[unit])  # (k, 32, 32)
    s = math.sqrt(((a - a.mean()) ** 2).sum() / a.size)
    assert formula == "std"
    assert got.shape == a.shape
    np.testing.assert_allclose(got, _sigmoid(p1 * a / (s + 1e-5) + p2), atol=1e-5)


def test_psi_with_batch_norm_uses_bn_output_over_gamma(tmp_path: Path) -> None:
    """conv1 (1x1) -> bn1 in eval mode: tau = bn_out / gamma = (a - mean) / sqrt(var + eps) + beta / gamma."""
    from collections import OrderedDict

    rng = np.random.default_rng(9)
    model = torch.nn.Sequential(OrderedDict(
        conv1=torch.nn.Conv2d(3, 6, 1), bn1=torch.nn.BatchNorm2d(6), relu1=torch.nn.ReLU(),
        conv2=torch.nn.Conv2d(6, 8, 1)))
    w, bias = rng.normal(size=(6, 3)), rng.normal(size=6)
    mean, var = rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)
    gamma, beta = np.array([1.5, 0.7, -0.5, 2.0, 0.3, 1.0]), rng.normal(size=6)
    with torch.no_grad():
        model.conv1.weight.copy_(torch.from_numpy(w)[:, :, None, None])
        model.conv1.bias.copy_(torch.from_numpy(bias))
        model.bn1.running_mean.copy_(torch.from_numpy(mean))
        model.bn1.running_var.copy_(torch.from_numpy(var))
        model.bn1.weight.copy_(torch.from_numpy(gamma))
        model.bn1.bias.copy_(torch.from_numpy(beta))
    torch.save(model.eval(), tmp_path / "bn.pth")
    results = make_results_dir(tmp_path, seed=9, model_source=str(tmp_path / "bn.pth"), model_kind="pickle")
    unit, p1, p2 = 2, 2.0, -0.5  # gamma < 0 for this unit: dividing by it flips the sign back
    formula, got = _layer_psi(results, "conv1", unit, p1, p2)
    _, x = _top_images(results, "conv1", unit)
    a = _pointwise_conv(x, w[unit], bias[unit])
    bn_out = gamma[unit] * (a - mean[unit]) / math.sqrt(var[unit] + 1e-5) + beta[unit]
    assert formula == "bn"
    np.testing.assert_allclose(got, _sigmoid(p1 * bn_out / gamma[unit] + p2), atol=1e-5)
    # the page says which formula each figure used
    render_report(results, psi_units={"conv1": [unit], "conv2": [1]}, trust_pickle=True, thumb_height=16)
    for layer, expected in (("conv1", "bn"), ("conv2", "std")):  # conv2 has no BN after it
        figs = [a for tag, a in parse(results / "report" / f"{layer}.html")
                if tag == "figure" and "psi" in a.get("class", "")]
        assert [f["data-formula"] for f in figs] == [expected]
    page = (results / "report" / "conv1.html").read_text()
    assert "tau = the output of bn1" in page and "gamma" in page


def test_one_layer_run_has_no_rud_over_two_layers(tmp_path: Path) -> None:
    results = make_results_dir(tmp_path, seed=10, layer_specs=[("conv1", 6, 8)])
    index = render_report(results, thumb_height=16).read_text()
    assert 'id="rud-last-two-na"' in index and "rud-last-two" not in index.replace("rud-last-two-na", "")


# ---------------------------------------------------------------- strips, order, index values, psi scale


def test_unit_pages_list_by_iou_with_both_strips(real_run: Path) -> None:
    summary = json.loads((real_run / "summary.json").read_text())
    assert summary["options"]["top_images_tiebreak"] == "area" and summary["options"]["label_strips"] == "on"
    for layer in summary["layers"]:
        page = real_run / "report" / f"{layer['name']}.html"
        tags = parse(page)
        button = next(a for tag, a in tags if "sort-button" in a.get("class", "") and a.get("data-key") == "iou")
        # shown as the active sort; no data-dir, so a first click sorts by IoU descending (report.js)
        assert "active" in button["class"].split() and button["data-initial"] == "desc" and "data-dir" not in button
        ious = [float(a["data-iou"]) for tag, a in tags if "unit-card" in a.get("class", "").split()]
        assert ious == sorted(ious, reverse=True)
        html = page.read_text()
        units = json.loads((real_run / layer["dir"] / "units.json").read_text())["units"]
        peak = [a for tag, a in tags if tag == "figure" and "peak-strip" in a.get("class", "")]
        assert len(peak) == sum(bool(u["top_images"]) for u in units) > 0
        assert html.count("top images by peak activation (ties: larger mask area)") == len(peak) * 2  # caption, alt
        label = [a for tag, a in tags if tag == "figure" and "label-strip" in a.get("class", "")]
        assert len(label) == sum(bool(u["label_top_images"]) for u in units)
        for u in units:
            if u["label_top_images"]:
                assert f"ranked by intersection with {u['label']}" in html
    strips = sorted((real_run / "report" / "thumbs" / "conv2").glob("label*.jpg"))
    conv2 = json.loads((real_run / "conv2" / "units.json").read_text())["units"]
    assert len(strips) == sum(bool(u["label_top_images"]) for u in conv2) > 0
    first = next(u for u in conv2 if u["label_top_images"])
    with Image.open(next(s for s in strips if s.name.startswith(f"label{first['unit']:04d}-"))) as im:
        assert im.width > 112 * (len(first["label_top_images"]) - 1)  # one tile per listed image


def test_index_has_the_layer_figure_and_no_bare_none(real_run: Path, tmp_path: Path) -> None:
    import re

    from reports.figures import layer_category_counts

    fixture = make_results_dir(tmp_path, seed=3)  # records nulls: metrics, input_size
    render_report(fixture)
    for results in (real_run, fixture):
        index = results / "report" / "index.html"
        html = index.read_text()
        img = next(a for tag, a in parse(index) if a.get("id") == "detectors-by-layer")
        assert (index.parent / img["src"]).is_file()
        text = re.sub(r"<[^>]+>", " ", html)
        assert not re.search(r"\bNone\b", text), re.findall(r".{40}\bNone\b.{40}", text)
        summary = json.loads((results / "summary.json").read_text())
        norm = summary["model"]["normalization"]
        shown = next(t for t in re.findall(r'id="normalization"[^>]*>([^<]*)<', html))
        assert shown.startswith("mean [") and f"{float(norm['std'][0]):.4g}" in shown
        size = re.findall(r'id="input-size">([^<]*)<', html)[0]
        recorded = summary["options"].get("input_size") or summary["model"].get("input_size")
        assert (str(recorded) in size) if recorded else size.startswith("native")
    rows = layer_category_counts(summary["layers"], summary["dataset"]["categories"])
    assert [name for name, _ in rows] == [l["name"] for l in summary["layers"]]
    assert [sum(c.values()) for _, c in rows] == [l["detectors"] for l in summary["layers"]]


def test_psi_figure_scale_follows_the_values_and_has_a_colour_bar() -> None:
    from reports.psi import psi_figure

    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    psi = torch.linspace(0.5, 0.7, 3 * 4 * 4).reshape(3, 4, 4)  # a firing unit: every value >= 0.5
    fig, scale = psi_figure(images, psi, "t")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(fig.axes) == 4 and len(bars) == 1
    assert 0.5 <= scale["vmin"] < 0.52 and 0.68 < scale["vmax"] <= 0.7  # not 0..1: the structure shows
    heat = fig.axes[0].get_images()[1]
    assert heat.get_clim() == (scale["vmin"], scale["vmax"])
    ticks = [float(t) for t in bars[0].get_yticks() if scale["vmin"] <= t <= scale["vmax"]]
    assert len(ticks) >= 2  # the bar carries numbers within the scale
    assert "percentile" in scale["rule"] and f"{scale['vmin']:.3f}" in scale["rule"]
    _, flat = psi_figure(images, torch.full((3, 4, 4), 0.6), "t")
    assert flat["vmax"] - flat["vmin"] == pytest.approx(1e-3)  # a constant map still gets a scale


def test_psi_captions_name_the_scale(real_run: Path) -> None:
    html = (real_run / "report" / "conv2.html").read_text()
    assert html.count("1st to 99th percentile of the psi values shown") == 2  # units 0 and 3
