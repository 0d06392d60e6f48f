"""The engine against an independent naive dissection of a hand-built model.

The images carry their own labels in their pixels (R = red pixels, G = car
pixels), so the model's units output known maps: indicator maps of chosen
labels, a constant, a shifted copy, noise. Expected thresholds, I, A, G, IoU,
labels and detector counts are then computed here with plain loops.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import measure
from torch import nn

from broden.writer import BrodenWriter
from dissect.config import DissectConfig
from dissect.results import load_results
from dissect.runner import dissect_model

CATS = ["color", "object", "part", "scene"]
LABELS = {1: ("red", "color"), 2: ("green", "color"), 300: ("car", "object"), 310: ("tree", "object"),
          400: ("wheel", "part"), 401: ("door", "part"), 500: ("street", "scene"), 501: ("kitchen", "scene")}
LAYERS = ["units", "pool", "block.0"]


def make_concept_broden(root: Path, n: int = 6, size: int = 8, seed: int = 0) -> Path:
    """n images (size x size) with label maps at the same size; R/G channels paint red/car pixels."""
    rng = np.random.default_rng(seed)
    w = BrodenWriter(root, CATS)
    for i, (name, _) in LABELS.items():
        w.add_label(i, name)
    for k in range(n):
        color = rng.choice([0, 1, 2], size=(size, size), p=[0.7, 0.15, 0.15])
        obj = rng.choice([0, 300, 310], size=(size, size), p=[0.8, 0.1, 0.1])
        part0 = rng.choice([0, 400], size=(size, size), p=[0.9, 0.1])
        part1 = rng.choice([0, 400, 401], size=(size, size), p=[0.9, 0.05, 0.05])  # 400 may sit in both layers
        img = np.zeros((size, size, 3), dtype=np.uint8)
        img[..., 0] = np.where(color == 1, 255, 0)
        img[..., 1] = np.where(obj == 300, 255, 0)
        img[..., 2] = rng.integers(0, 256, size=(size, size))
        layers = {"color": [color], "object": [obj] if k % 3 else []}  # some images lack objects
        if k % 2 == 0:
            layers["part"] = [part0, part1]
        scene = [[500], [501], []][k % 3]
        w.add_image(f"im{k}", img, layers=layers, image_labels={"scene": scene},
                    split="train" if k % 2 else "val")
    w.close()
    return root


class Probe(nn.Module):
    """Six units with known maps from the normalisation-free input x = img / 255."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g, b = x[:, 0], x[:, 1], x[:, 2]  # (B, H, W)
        return torch.stack([r, g, torch.full_like(r, 0.5), torch.roll(r, 1, dims=2), b, r + 0.5 * g], 1)


class ConceptNet(nn.Module):
    """units (full res) -> pool (half res) -> block.0 (1x1 conv with seeded weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = Probe()
        self.pool = nn.AvgPool2d(2)
        self.block = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.block[0].weight.copy_(torch.randn(4, 6, 1, 1, generator=gen))
            self.block[0].bias.zero_()
            self.block[1].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
            self.block[1].running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(self.units(x))).mean(dim=(2, 3))


def config(**kw) -> DissectConfig:
    base = dict(top_fraction=0.2, normalize="none", top_k=3, batch_size=4)
    base.update(kw)
    return DissectConfig(**base)


# ---------------------------------------------------------------- the naive reference

def naive_maps(model: nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """Layer outputs of every image, one image at a time."""
    out = {}
    for n in range(len(images)):
        x = torch.from_numpy(images[n:n + 1]).float() / 255
        with torch.no_grad():
            u = model.units(x)
            p = model.pool(u)
            c = model.block[0](p)
        for name, t in (("units", u), ("pool", p), ("block.0", c)):
            out.setdefault(name, []).append(t[0].numpy())
    return {k: np.stack(v) for k, v in out.items()}


def load_all(root: Path):
    """Images, label layers and image labels straight from the files (no broden.dataset)."""
    import csv
    from PIL import Image

    rows = list(csv.DictReader(open(root / "index.csv")))
    images, planes, scalars = [], [], []
    for r in rows:
        images.append(np.asarray(Image.open(root / "images" / r["image"]).convert("RGB")).transpose(2, 0, 1))
        ps, ss = [], []
        for cat in CATS:
            for e in filter(None, r[cat].split(";")):
                if e.isdigit():
                    ss.append(int(e))
                else:
                    rgb = np.asarray(Image.open(root / "images" / e)).astype(np.int64)
                    ps.append(rgb[..., 0] + 256 * rgb[..., 1])
        planes.append(ps)
        scalars.append(ss)
    return np.stack(images), planes, scalars


def naive_mask_areas(maps: np.ndarray, thresholds: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """(N, U) |upsample(map) > T| at the label size, one image and unit at a time."""
    n, u = maps.shape[:2]
    out = np.zeros((n, u), np.int64)
    for i in range(n):
        for j in range(u):
            up = F.interpolate(torch.from_numpy(maps[i, j])[None, None], size=(sh, sw), mode="bilinear",
                               align_corners=False)[0, 0].numpy()
            out[i, j] = int((up > thresholds[j]).sum())
    return out


def naive_tally(maps: np.ndarray, thresholds: np.ndarray, planes, scalars, sh: int, sw: int, union: str):
    """I, A, G by loops over images, units, layers and pixels."""
    ids = sorted(LABELS)
    L = max(ids) + 1
    cat_of = {i: CATS.index(c) for i, (_, c) in LABELS.items()}
    N, U = maps.shape[:2]
    I = np.zeros((U, L), np.int64)
    A = np.zeros((U, len(CATS)), np.int64)
    G = np.zeros(L, np.int64)
    up = F.interpolate(torch.from_numpy(maps).float(), size=(sh, sw), mode="bilinear",
                       align_corners=False).numpy()
    for n in range(N):
        for p in planes[n]:
            for y in range(sh):
                for x in range(sw):
                    if p[y, x]:
                        G[p[y, x]] += 1
        for s in scalars[n]:
            G[s] += sh * sw
        for u in range(U):
            mask = up[n, u] > thresholds[u]
            present = set()
            for p in planes[n]:
                for y in range(sh):
                    for x in range(sw):
                        if p[y, x] and mask[y, x]:
                            I[u, p[y, x]] += 1
                            present.add(cat_of[p[y, x]])
                        if p[y, x] and union == "original":
                            present.add(cat_of[p[y, x]])
            for s in scalars[n]:
                I[u, s] += int(mask.sum())
                present.add(cat_of[s])
            for c in present:
                A[u, c] += int(mask.sum())
    return I, A, G


def naive_labels(I, A, G, threshold=0.04):
    """Per category best label (smallest id on ties, 0 when all IoUs are 0), top = last best category."""
    U = I.shape[0]
    cat_of = {i: CATS.index(c) for i, (_, c) in LABELS.items()}
    cat_lab = np.zeros((len(CATS), U), np.int64)
    cat_score = np.zeros((len(CATS), U))
    for u in range(U):
        for c in range(len(CATS)):
            best, score = 0, 0.0
            for l in sorted(LABELS):
                if cat_of[l] != c:
                    continue
                iou = I[u, l] / (A[u, c] + G[l] - I[u, l] + 1e-10)
                if iou > score:
                    best, score = l, iou
            cat_lab[c, u], cat_score[c, u] = best, score
    top_c = np.zeros(U, np.int64)
    for u in range(U):
        for c in range(len(CATS)):
            if cat_score[c, u] >= cat_score[top_c[u], u]:
                top_c[u] = c
    top_l = cat_lab[top_c, np.arange(U)]
    top_s = cat_score[top_c, np.arange(U)]
    return cat_lab, cat_score, top_c, top_l, top_s


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def concept_root(tmp_path_factory) -> Path:
    return make_concept_broden(tmp_path_factory.mktemp("concept") / "broden")


@pytest.mark.parametrize("union", ["lite", "original"])
def test_engine_matches_naive_dissection(concept_root, union):
    model = ConceptNet().eval()
    res = dissect_model(model, concept_root, LAYERS, config(union=union))
    images, planes, scalars = load_all(concept_root)
    maps = naive_maps(model, images)
    for name in LAYERS:
        lr = res.layer(name)
        flat = maps[name].transpose(1, 0, 2, 3).reshape(maps[name].shape[1], -1)  # (U, N*h*w)
        thr = np.quantile(flat, 0.8, axis=1, method="hazen")
        np.testing.assert_allclose(lr.thresholds, thr, rtol=1e-6, atol=1e-7)
        I, A, G = naive_tally(maps[name], lr.thresholds, planes, scalars, 8, 8, union)
        np.testing.assert_array_equal(lr.intersection[:, :I.shape[1]], I)
        np.testing.assert_array_equal(lr.activation, A)
        np.testing.assert_array_equal(lr.truth[:G.shape[0]], G)
        cat_lab, cat_score, top_c, top_l, top_s = naive_labels(I, A, G)
        np.testing.assert_array_equal(lr.labels.cat_labels, cat_lab)
        np.testing.assert_allclose(lr.labels.cat_scores, cat_score, rtol=1e-12)
        np.testing.assert_array_equal(lr.labels.top_category, top_c)
        np.testing.assert_array_equal(lr.labels.top_label, top_l)
        assert lr.counts["detectors"] == int((top_s >= 0.04).sum())
        # top images: by spatial max, ties to the larger mask area (at label size), then the smaller index
        smax = maps[name].max(axis=(2, 3))  # (N, U)
        area = naive_mask_areas(maps[name], lr.thresholds, 8, 8)  # (N, U)
        for u in range(smax.shape[1]):
            order = sorted(range(len(smax)), key=lambda i: (-smax[i, u], -area[i, u], i))[:3]
            assert lr.top_indices[u].tolist() == order
            # mask compactness: one scikit-image call per top-image mask, averaged over non-empty masks
            counts, spreads = [], []
            for i in order:
                up = F.interpolate(torch.from_numpy(maps[name][i, u])[None, None], size=(8, 8), mode="bilinear",
                                   align_corners=False)[0, 0].numpy()
                mask = up > lr.thresholds[u]
                if mask.any():
                    counts.append(measure.label(mask, connectivity=2).max())
                    ys, xs = np.nonzero(mask)
                    spreads.append(np.hypot(ys - ys.mean(), xs - xs.mean()).mean() / 8)
            if counts:
                assert lr.mask_components[u] == pytest.approx(np.mean(counts))
                assert lr.mask_spread[u] == pytest.approx(np.mean(spreads))
            else:
                assert np.isnan(lr.mask_components[u]) and np.isnan(lr.mask_spread[u])
    units = res.layer("units")
    # unit 0 is the red indicator: label red with IoU exactly 1; unit 2 is constant: no label
    assert units.labels.top_label[0] == 1 and units.labels.top_score[0] == pytest.approx(1.0)
    assert units.labels.top_label[2] == 0 and units.labels.top_score[2] == 0
    if union == "lite":
        # green's car indicator: car pixels exactly; the lite union only counts object where it lies under the mask
        assert units.labels.cat_labels[1, 1] == 300 and units.labels.cat_scores[1, 1] == pytest.approx(1.0)


def test_batched_equals_unbatched(concept_root, tmp_path):
    model = ConceptNet().eval()
    outs = []
    for bs, keep in ((1, "no"), (4, "yes"), (64, "auto")):
        out = tmp_path / f"bs{bs}"
        dissect_model(model, concept_root, LAYERS, config(batch_size=bs, keep_activations=keep, groups=2), out=out)
        outs.append(out)
    for out in outs[1:]:
        for name in LAYERS:
            for f in ("tally.csv", "units.json", "thresholds.npy", "top_activations.npy", "iou.npy",
                      "label_top_activations.npy"):
                assert (out / name / f).read_bytes() == (outs[0] / name / f).read_bytes(), (out, name, f)
        a, b = (json.loads((o / "summary.json").read_text()) for o in (outs[0], out))
        for d in (a, b):
            d.pop("timings")
            for k in ("batch_size", "keep_activations"):
                d["options"].pop(k)
        assert a == b


@pytest.mark.parametrize("split", [None, "train"])  # train: images 1, 3, 5, whose indices are not positions
def test_mask_pixels_kept_between_stages_change_no_result(concept_root, tmp_path, caplog, split):
    """Stage 2's pixels, read back by the label stage and the strips, give the files finding them again gives."""
    model = ConceptNet().eval()
    outs = {}
    for name, budget in (("kept", 4096), ("found_again", 0)):  # 0 MiB: no room beside the activations
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dissect"):
            dissect_model(model, concept_root, LAYERS, config(keep_activations="yes", activation_budget_mb=budget,
                                                              groups=2, split=split, batch_size=2, top_k=2),
                          out=tmp_path / name)
        assert ("mask pixels kept between stages" in caplog.text) == (name == "kept"), caplog.text
        outs[name] = tmp_path / name
    for layer in LAYERS:
        for f in ("tally.csv", "units.json", "top_activations.npy", "label_top_activations.npy"):
            assert (outs["kept"] / layer / f).read_bytes() == (outs["found_again"] / layer / f).read_bytes(), f
    units = json.loads((outs["kept"] / "units" / "units.json").read_text())["units"]
    assert any(u["label_top_images"] for u in units) and any(u["mask_components"] for u in units)


def test_outputs_follow_the_contract(concept_root, tmp_path):
    out = tmp_path / "res"
    res = dissect_model(ConceptNet().eval(), concept_root, LAYERS, config(groups=2), out=out)
    s = json.loads((out / "summary.json").read_text())
    assert s["format"] == "dissect-results" and s["version"] == 1 and s["seed"] == 0
    assert s["options"]["top_fraction"] == 0.2 and s["options"]["union"] == "lite"
    assert s["dataset"]["num_images"] == 6 and s["dataset"]["categories"] == CATS
    assert [l["id"] for l in s["labels"]] == sorted(LABELS)
    assert {l["id"]: l["category"] for l in s["labels"]} == {i: c for i, (_, c) in LABELS.items()}
    assert [l["name"] for l in s["layers"]] == LAYERS
    for entry, lr in zip(s["layers"], res.layers):
        assert entry["num_units"] == lr.shape[0]
        assert set(entry["unique_detectors"]) == {"paper", "top_label"}
        assert entry["rud"]["paper"] == entry["unique_detectors"]["paper"]["total"] / entry["num_units"]
        assert len(entry["groups"]) == 2
        d = out / entry["dir"]
        units = json.loads((d / "units.json").read_text())
        assert units["layer"] == entry["name"] and len(units["units"]) == entry["num_units"]
        u0 = units["units"][0]
        assert set(u0) >= {"unit", "label", "label_id", "category", "iou", "threshold", "group", "per_category",
                           "top_images"}
        assert set(u0["per_category"]) == set(CATS)
        assert u0["top_images"][0]["image"].startswith("synthetic/im")
        U, h, w = lr.shape
        assert np.load(d / "thresholds.npy").dtype == np.float32
        assert np.load(d / "top_activations.npy").shape == (U, 3, h, w)
        assert np.load(d / "iou.npy").shape == (U, len(LABELS))
    # the block.0 groups: relevance is the Frobenius norm of the group's filters
    block = res.layer("block.0")
    wgt = ConceptNet().block[0].weight.detach().double()
    assert block.groups[0]["relevance"] == pytest.approx(float(wgt[:2].norm()))
    assert block.groups[1]["relevance_bn"] is not None
    last_two = s["layers"][-2:]
    expect = sum(e["unique_detectors"]["paper"]["total"] for e in last_two) / sum(e["num_units"] for e in last_two)
    assert s["rud_last_two"]["paper"] == pytest.approx(expect)
    frames = load_results(out)
    assert list(frames["summary"]["layer"]) == LAYERS
    assert len(frames["units"]) == sum(lr.shape[0] for lr in res.layers)
    red = frames["units"].query("layer == 'units' and unit == 0").iloc[0]
    assert red["label"] == "red" and red["iou"] == pytest.approx(1.0)


def test_category_selection_and_limit(concept_root):
    res = dissect_model(ConceptNet().eval(), concept_root, ["units"],
                        config(categories=["object", "scene"], limit=4))
    lr = res.layer("units")
    assert lr.labels.categories == ["object", "scene"]
    assert res.dataset.num_images == 4
    assert lr.truth[1] == 0  # color layers were not read
    assert set(np.unique(lr.labels.top_label)) <= {0, 300, 310, 500, 501}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_equals_cuda(concept_root, tmp_path):
    model = ConceptNet().eval()
    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = tmp_path / dev
        dissect_model(model, concept_root, ["units", "pool"], config(device=dev), out=outs[dev])
    for name in ("units", "pool"):  # exact ops only: the 1x1 conv may use TF32 on the GPU
        for f in ("tally.csv", "units.json", "thresholds.npy", "top_activations.npy", "iou.npy",
                  "label_top_activations.npy"):
            assert (outs["cpu"] / name / f).read_bytes() == (outs["cuda"] / name / f).read_bytes(), (name, f)


# ---------------------------------------------------------------- options the run really used

def test_loaded_model_input_size_is_the_default(concept_root):
    from broden.errors import InputError
    from dissect.models import model_from_module

    # the stored images are 8x8; a model loaded for 4x4 inputs must see 4x4 ones
    loaded = model_from_module(ConceptNet().eval(), normalization="none", input_size=4)
    res = dissect_model(loaded, concept_root, ["units", "pool"], config())
    assert res.layer("units").shape == (6, 4, 4) and res.layer("pool").shape == (6, 2, 2)
    assert res.options["input_size"] == 4
    with pytest.raises(InputError, match="input_size 6"):
        dissect_model(loaded, concept_root, ["units"], config(input_size=6))


def test_loaded_model_normalization_conflict_is_an_error(concept_root):
    from broden.errors import InputError
    from dissect.models import model_from_module

    loaded = model_from_module(ConceptNet().eval(), normalization="none")
    with pytest.raises(InputError, match="normalize 'imagenet'"):
        dissect_model(loaded, concept_root, ["units"], config(normalize="imagenet"))
    res = dissect_model(loaded, concept_root, ["units"], config(normalize=None))
    assert res.model["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}


def test_options_record_the_given_dataset_selection(concept_root):
    from broden.dataset import BrodenDataset
    from broden.errors import InputError

    ds = BrodenDataset(concept_root, categories=["scene", "color"], split="train", limit=2, cache="off")
    res = dissect_model(ConceptNet().eval(), ds, ["units"], config())
    # what was used, in category.csv order, and not the config's None defaults
    assert (res.options["categories"], res.options["split"], res.options["limit"]) == (["color", "scene"], "train", 2)
    assert res.dataset.num_images == 2
    assert res.layer("units").labels.categories == ["color", "scene"]
    for bad, field in ((dict(split="val"), "split"), (dict(limit=3), "limit"), (dict(categories=["color"]), "categories")):
        with pytest.raises(InputError, match=field):
            dissect_model(ConceptNet().eval(), ds, ["units"], config(**bad))
    same = dissect_model(ConceptNet().eval(), ds, ["units"], config(categories=["color", "scene"], split="train", limit=2))
    assert same.options["categories"] == ["color", "scene"]


def test_layers_run_in_network_order(concept_root, tmp_path):
    out = tmp_path / "res"
    res = dissect_model(ConceptNet().eval(), concept_root, ["block.0", "units", "pool"], config(), out=out)
    assert [lr.name for lr in res.layers] == ["units", "pool", "block.0"]
    assert res.options["layers"] == ["units", "pool", "block.0"]
    s = json.loads((out / "summary.json").read_text())
    assert [e["name"] for e in s["layers"]] == ["units", "pool", "block.0"]
    by_name = {e["name"]: e for e in s["layers"]}
    for d in ("paper", "top_label"):
        uniq = by_name["pool"]["unique_detectors"][d]["total"] + by_name["block.0"]["unique_detectors"][d]["total"]
        assert s["rud_last_two"][d] == pytest.approx(uniq / (6 + 4))
    one = dissect_model(ConceptNet().eval(), concept_root, ["pool"], config(), out=tmp_path / "one")
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["rud_last_two"] is None
    assert len(one.layers) == 1


def test_preprocess_is_shared_and_follows_the_formula():
    import reports.psi
    from dissect.preprocess import preprocess

    assert reports.psi.preprocess is preprocess  # psi replays exactly the dissection's input
    img = torch.tensor([[[0, 255], [51, 102]]] * 3, dtype=torch.uint8)[None]  # (1, 3, 2, 2)
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}
    got = preprocess(img, norm, None)
    for c in range(3):
        for y in range(2):
            for x in range(2):
                want = (int(img[0, c, y, x]) / 255 - norm["mean"][c]) / norm["std"][c]
                assert float(got[0, c, y, x]) == pytest.approx(want, rel=1e-6, abs=1e-7)
    # a square resize of a constant image stays constant: only the size changes
    flat = torch.full((2, 3, 6, 9), 51, dtype=torch.uint8)
    small = preprocess(flat, norm, 4)
    assert small.shape == (2, 3, 4, 4)
    assert torch.allclose(small[:, 0], torch.full((2, 4, 4), (0.2 - 0.1) / 0.5))


# ---------------------------------------------------------------- top-image ties and label strips

def test_top_images_tiebreak_changes_only_which_images(concept_root, tmp_path):
    model = ConceptNet().eval()
    by_area = dissect_model(model, concept_root, LAYERS, config(), out=tmp_path / "area")
    by_index = dissect_model(model, concept_root, LAYERS, config(top_images_tiebreak="index"),
                             out=tmp_path / "index")
    maps = naive_maps(model, load_all(concept_root)[0])
    differ = 0
    for name in LAYERS:
        a, i = by_area.layer(name), by_index.layer(name)
        smax = maps[name].max(axis=(2, 3))
        area = naive_mask_areas(maps[name], a.thresholds, 8, 8)
        for u in range(smax.shape[1]):
            assert i.top_indices[u].tolist() == sorted(range(len(smax)), key=lambda n: (-smax[n, u], n))[:3]
            assert a.top_indices[u].tolist() == sorted(range(len(smax)),
                                                       key=lambda n: (-smax[n, u], -area[n, u], n))[:3]
            differ += a.top_indices[u].tolist() != i.top_indices[u].tolist()
        # the tie rule picks images; it never touches thresholds, tallies or labels
        assert (tmp_path / "area" / name / "tally.csv").read_bytes() == \
            (tmp_path / "index" / name / "tally.csv").read_bytes()
        np.testing.assert_array_equal(a.intersection, i.intersection)
        np.testing.assert_array_equal(a.thresholds, i.thresholds)
    assert differ > 0  # the fixture has peak ties that the area breaks differently
    opts = json.loads((tmp_path / "area" / "summary.json").read_text())["options"]
    assert opts["top_images_tiebreak"] == "area" and opts["label_strips"] == "on"


def _naive_label_intersections(maps, thresholds, planes, scalars, labels):
    """(N, U): per image, I[u, labels[u]] of that image alone (the naive tally of one image)."""
    n, u = maps.shape[:2]
    out = np.zeros((n, u), np.int64)
    for i in range(n):
        I, _, _ = naive_tally(maps[i:i + 1], thresholds, planes[i:i + 1], scalars[i:i + 1], 8, 8, "lite")
        for j in range(u):
            out[i, j] = I[j, labels[j]] if labels[j] > 0 else 0
    return out


@pytest.mark.parametrize("keep", ["yes", "no"])
def test_label_strips_rank_by_intersection_with_the_label(concept_root, tmp_path, keep):
    model = ConceptNet().eval()
    res = dissect_model(model, concept_root, LAYERS, config(top_k=6, keep_activations=keep), out=tmp_path)
    images, planes, scalars = load_all(concept_root)
    maps = naive_maps(model, images)
    shown = 0
    for name in LAYERS:
        lr = res.layer(name)
        want = _naive_label_intersections(maps[name], lr.thresholds, planes, scalars, lr.labels.top_label)
        units = json.loads((tmp_path / name / "units.json").read_text())["units"]
        saved = np.load(tmp_path / name / "label_top_activations.npy")
        assert saved.dtype == np.float32 and saved.shape == (len(units), 6) + maps[name].shape[2:]
        for u, unit in enumerate(units):
            order = [n for n in sorted(range(len(images)), key=lambda n: (-want[n, u], n)) if want[n, u] > 0]
            got = unit["label_top_images"]
            assert [t["index"] for t in got] == order
            assert [t["intersection"] for t in got] == [int(want[n, u]) for n in order]
            # every image with an intersection is listed: together they make the tally's I[u, label]
            label = int(lr.labels.top_label[u])
            assert sum(t["intersection"] for t in got) == (lr.intersection[u, label] if label else 0)
            for j, n in enumerate(order):
                np.testing.assert_array_equal(saved[u, j], maps[name][n, u])
            assert not saved[u, len(order):].any()  # slots without an intersection hold zeros
            shown += len(order)
    assert shown > 0
    # unit 0 of "units" is the red indicator: its best image is the one with the most red pixels
    red = [int((p[0] == 1).sum()) for p in planes]
    first = json.loads((tmp_path / "units" / "units.json").read_text())["units"][0]["label_top_images"][0]
    assert first["index"] == int(np.argmax(red)) and first["intersection"] == max(red)


def test_label_strips_off_writes_no_strip_file(concept_root, tmp_path):
    from dissect.results import missing_outputs, read_summary

    model = ConceptNet().eval()
    dissect_model(model, concept_root, ["units"], config(), out=tmp_path)
    assert (tmp_path / "units" / "label_top_activations.npy").is_file()
    dissect_model(model, concept_root, ["units"], config(label_strips="off"), out=tmp_path)
    assert not (tmp_path / "units" / "label_top_activations.npy").exists()  # the earlier run's is gone
    units = json.loads((tmp_path / "units" / "units.json").read_text())["units"]
    assert all(u["label_top_images"] is None for u in units)
    summary = read_summary(tmp_path)
    assert summary["options"]["label_strips"] == "off" and "label_strips" not in summary["timings"]
    timings = summary["timings"]  # the loader wait is a part of the passes' time, not a stage of its own
    assert set(timings) == {"thresholds", "tally", "label", "data_wait"}
    assert 0 <= timings["data_wait"] <= timings["thresholds"] + timings["tally"]
    assert missing_outputs(tmp_path, summary) == []


def test_float32_math_sets_and_restores_cuda_precision(monkeypatch):
    """The forward runs in IEEE float32 on CUDA unless --tf32 on; the caller's settings come back after."""
    from dissect.devices import float32_math

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    before = torch.get_float32_matmul_precision()
    with float32_math(torch.device("cpu")):  # a no-op off CUDA
        assert torch.backends.cudnn.allow_tf32 is True
    with float32_math(torch.device("cuda")):  # flags only: nothing runs on a device here
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    with float32_math(torch.device("cuda"), allow_tf32=True):
        assert torch.backends.cudnn.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32 is True and torch.get_float32_matmul_precision() == before
    assert config().tf32 == "off" and "tf32" in DissectConfig.result_fields()
    assert config(tf32="on").result_key() != config().result_key()


def test_activation_budget_is_half_the_free_memory_unless_given(tmp_path, monkeypatch):
    """--activation-budget-mb: the given MiB, else half of MemAvailable shared by the machine's ranks."""
    from dissect import devices

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   8388608 kB\n")
    cpu = torch.device("cpu")
    assert devices.available_memory(cpu, meminfo=str(meminfo)) == 8 * 2 ** 30
    monkeypatch.setattr(devices, "available_memory", lambda device: 8 * 2 ** 30)
    assert devices.activation_budget_mb(None, cpu) == 4096
    assert devices.activation_budget_mb(None, cpu, processes=4) == 1024
    assert devices.activation_budget_mb(300, cpu, processes=4) == 300  # given: as it is
    monkeypatch.setattr(devices, "available_memory", lambda device: None)
    assert devices.activation_budget_mb(None, cpu) == devices.FALLBACK_BUDGET_MB
    assert config().activation_budget_mb is None and "activation_budget_mb" not in DissectConfig.result_fields()


def test_budget_from_free_memory_decides_what_is_kept(concept_root, tmp_path, monkeypatch, caplog):
    """The budget comes from the free memory unless given (recorded as given); under the activations' size they
    are recomputed, with the same results."""
    from dissect import devices

    caplog.set_level("INFO", logger="dissect.pipeline")
    monkeypatch.setattr(devices, "available_memory", lambda device: 6 * 2 ** 20)  # 6 MiB free: budget 3
    out = tmp_path / "small"
    dissect_model(ConceptNet().eval(), concept_root, LAYERS, config(), out=out)
    assert json.loads((out / "summary.json").read_text())["options"]["activation_budget_mb"] is None
    assert "budget 3 MiB: kept between stages" in caplog.text
    caplog.clear()
    given = tmp_path / "given"
    dissect_model(ConceptNet().eval(), concept_root, LAYERS, config(activation_budget_mb=0), out=given)
    assert json.loads((given / "summary.json").read_text())["options"]["activation_budget_mb"] == 0
    assert "budget 0 MiB: recomputed in each later stage" in caplog.text
    for name in LAYERS:
        assert (out / name / "tally.csv").read_bytes() == (given / name / "tally.csv").read_bytes()
