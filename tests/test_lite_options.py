"""The NetDissect-Lite drop-in options: list flags, --images, --upsample, --thresholds, Lite's
normalisation arithmetic, primary categories among the selected ones, and '(none)' labels in reports."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dissect
from broden.dataset import BrodenDataset, has_selected_data
from broden.errors import InputError
from broden_fixtures import TINY_CATEGORIES, make_tiny_broden
from dissect.config import DissectConfig


class Maps(nn.Module):
    """Two units on x = img / 255: unit 0 constant 0.5, unit 1 the red channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full_like(x[:, 0], 0.5), x[:, 0]], 1)


def maps_net() -> nn.Module:
    """pool (8 -> 4 px, the label size) -> maps (2 units, 4x4) -> down (2x2)."""
    return nn.Sequential(OrderedDict(pool=nn.AvgPool2d(2), maps=Maps(), down=nn.AvgPool2d(2)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_broden(tmp_path_factory.mktemp("tiny") / "broden")


def _run(tiny: Path, out: Path, **options):
    base = {"layers": ["maps"], "normalize": "none", "quiet": True, "device": "cpu", "decoded_cache": "off",
            "top_fraction": 0.2}
    return dissect.run(maps_net(), tiny, out, **{**base, **options})


# ---------------------------------------------------------------- 1. list flags

def test_list_flags_mix_commas_and_spaces(tmp_path: Path) -> None:
    from dissect.cli import build_parser

    argv = ["run", "m.pth", "--dataset", "d", "--out", "o", "--categories", "object,part", "scene",
            "--layers", "features.0,features.3", "features.6", "--thresholds", "features.0=a.npy,features.3=b.npy",
            "--thresholds", "features.6=c.npy"]
    args = build_parser().parse_args(argv)
    # `dissect run` hands argparse's values to dissect.run unsplit: validation splits them
    config = DissectConfig.from_dict({k: getattr(args, k) for k in DissectConfig.option_names()})
    assert config.categories == ["object", "part", "scene"]
    assert config.layers == ["features.0", "features.3", "features.6"]
    assert config.thresholds == ["features.0=a.npy", "features.3=b.npy", "features.6=c.npy"]
    assert DissectConfig.from_args(args).categories == ["object", "part", "scene"]


def test_cli_run_with_mixed_lists_and_a_state_dict(tiny: Path, tmp_path: Path) -> None:
    from dissect.architectures import build_model
    from dissect.cli import main

    model = build_model("tiny_cnn", num_classes=2, width1=4, width2=3)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "weights.pth"), "--arch", "cgl:tiny_cnn", "--dataset", str(tiny), "--out",
                 str(out), "--layers", "conv2,conv1", "--categories", "texture,object", "color", "--no-report",
                 "--quiet", "--device", "cpu", "--decoded-cache", "off"])
    assert code == 2  # default tiny_cnn widths (128/256) do not fit these weights: a clear input error
    torch.save(build_model("tiny_cnn", num_classes=2).state_dict(), tmp_path / "weights.pth")
    code = main(["run", str(tmp_path / "weights.pth"), "--arch", "cgl:tiny_cnn", "--dataset", str(tiny), "--out",
                 str(out), "--layers", "conv2,conv1", "--categories", "texture,object", "color", "--no-report",
                 "--quiet", "--device", "cpu", "--decoded-cache", "off"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["layers"] == ["conv1", "conv2"]  # network order
    assert summary["options"]["categories"] == ["color", "object", "texture"]  # category.csv order
    assert summary["model"]["arch"] == "cgl:tiny_cnn"


# ---------------------------------------------------------------- 3. --images

def test_with_images_of_a_dataset_writing_its_cache_serves_its_own_rows(tiny: Path, tmp_path: Path) -> None:
    writing = BrodenDataset(tiny, categories=["material"], cache=tmp_path / "cache", images="all", write_cache=True)
    first = writing.get_batch([0, 1, 2, 3])  # staged in the writer, by position in all 7 rows
    subset = writing.with_images("annotated")  # img0, img2, img5
    plain = BrodenDataset(tiny, categories=["material"], cache="off", images="annotated")
    got, want = subset.get_batch([0, 1, 2]), plain.get_batch([0, 1, 2])
    assert torch.equal(got["index"], want["index"]) and torch.equal(got["image"], want["image"])
    assert torch.equal(got["labels"], want["labels"])
    subset.close()  # the copy's close leaves the original's writer alone
    assert torch.equal(writing.get_batch([0, 1, 2, 3])["image"], first["image"])
    writing.close()


def test_annotated_keeps_rows_with_data_in_a_selected_category(tiny: Path) -> None:
    by_name = lambda ds: [Path(ds.record(i).image).stem for i in range(len(ds))]  # noqa: E731
    material = BrodenDataset(tiny, categories=["material"], cache="off", images="annotated")
    assert by_name(material) == ["img0", "img2", "img5"] and material.dropped_images == 4
    scene = BrodenDataset(tiny, categories=["scene"], cache="off", images="annotated")  # image-level labels count
    assert by_name(scene) == ["img0", "img1", "img4", "img5"] and scene.dropped_images == 3
    both = BrodenDataset(tiny, categories=["material", "scene"], cache="off", images="annotated")
    assert by_name(both) == ["img0", "img1", "img2", "img4", "img5"]
    color = BrodenDataset(tiny, categories=["color", "material"], cache="off", images="annotated")
    assert len(color) == 7 and color.dropped_images == 0  # colour labels every image
    every = BrodenDataset(tiny, categories=["material"], cache="off", images="all")
    assert len(every) == 7 and every.dropped_images == 0
    # the split first, then the rule, then the limit
    val = BrodenDataset(tiny, categories=["material"], split="val", limit=1, cache="off", images="annotated")
    assert by_name(val) == ["img2"] and val.dropped_images == 1  # val: img2, img3, img5; img3 has none
    back = val.with_images("all")
    assert by_name(back) == ["img2"] and back.split == "val" and back.categories == ["material"]
    assert by_name(material.with_images("all")) == [f"img{i}" for i in range(7)] and len(material) == 3
    record = material.meta.records[3]  # img3: colour only
    assert has_selected_data(record, ["color"]) and not has_selected_data(record, ["object", "scene"])
    with pytest.raises(InputError, match="images: expected one of annotated, all, got 'some'"):
        BrodenDataset(tiny, cache="off", images="some")


def test_images_option_is_applied_and_recorded(tiny: Path, tmp_path: Path) -> None:
    annotated = _run(tiny, tmp_path / "a", categories=["material", "scene"])
    s = annotated.summary_json
    assert s["options"]["images"] == "annotated"
    assert (s["dataset"]["num_images"], s["dataset"]["dropped_images"]) == (5, 2)
    assert annotated.result.layers[0].top_indices.max() <= 5 and 3 not in annotated.result.layers[0].top_indices
    every = _run(tiny, tmp_path / "b", categories=["material", "scene"], images="all")
    assert (every.summary_json["dataset"]["num_images"], every.summary_json["dataset"]["dropped_images"]) == (7, 0)
    assert every.summary_json["run_key"] != s["run_key"]
    # a dataset built with the other rule is dissected under the option's rule
    built = BrodenDataset(tiny, categories=["material", "scene"], cache="off", images="all")
    again = dissect.run(maps_net(), built, None, layers=["maps"], normalize="none", quiet=True, top_fraction=0.2)
    assert again.summary_json["dataset"]["num_images"] == 5
    assert np.array_equal(again.result.layers[0].intersection, annotated.result.layers[0].intersection)


# ---------------------------------------------------------------- primary categories among the selected

def test_primary_category_is_taken_among_the_selected_categories(tiny: Path, tmp_path: Path) -> None:
    ds = BrodenDataset(tiny, categories=["color", "object"], cache="off")
    meta = ds.meta
    obj, mat = meta.categories.index("object"), meta.categories.index("material")
    assert meta.label_category[9] == mat  # tile: equal coverage in object and material, the later wins
    assert ds.label_category[9] == obj  # material not selected: Lite puts tile in object
    assert ds.label_category[300] == obj and ds.label_category[513] == -1 and ds.label_category[8] == -1
    assert np.array_equal(meta.primary_categories(TINY_CATEGORIES), meta.label_category)
    res = _run(tiny, tmp_path / "out", categories=["color", "object"], images="all")
    table = {entry["id"]: entry["category"] for entry in res.summary_json["labels"]}
    assert table[9] == "object" and 513 not in table
    # tile's pixels are tallied as object pixels
    assert res.result.layers[0].truth[9] > 0 and res.result.layers[0].iou[:, 9].max() > 0


# ---------------------------------------------------------------- 5. Lite's normalisation arithmetic

def test_lite_normalization_reproduces_lites_input_bit_for_bit() -> None:
    from dissect.models import NORMALIZATIONS
    from dissect.preprocess import preprocess

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(4, 9, 7, 3), dtype=np.uint8)
    # NetDissect-Lite: float32 BGR image minus its BGR mean pixel (numpy, in place), channels back to
    # RGB, then the float32 tensor divided by 255 * 0.224
    batch = []
    for image in rgb:
        img = np.array(image, dtype=np.float32)[:, :, ::-1]
        img -= [109.5388, 118.6897, 124.6901]
        batch.append(img.transpose(2, 0, 1))
    lite = torch.from_numpy(np.stack(batch)[:, ::-1].copy())
    lite.div_(255.0 * 0.224)
    ours = preprocess(torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous(), NORMALIZATIONS["lite"], None)
    assert ours.dtype == torch.float32 and torch.equal(ours, lite)


# ---------------------------------------------------------------- 7. --upsample

def test_upsample_option_reaches_the_tally_and_the_record(tiny: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from dissect import pipeline

    seen: list[str] = []
    original = pipeline.IoUTally.add_activations

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("upsample", "torch"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.IoUTally, "add_activations", spy)
    pil = _run(tiny, tmp_path / "pil", upsample="pil", layers=["maps", "down"])
    assert seen and set(seen) == {"pil"} and pil.summary_json["options"]["upsample"] == "pil"
    seen.clear()
    torch_run = _run(tiny, tmp_path / "torch", layers=["maps", "down"])
    assert set(seen) == {"torch"} and torch_run.summary_json["options"]["upsample"] == "torch"
    assert pil.summary_json["run_key"] != torch_run.summary_json["run_key"]
    with pytest.raises(InputError, match="--upsample 'scipy'.*one of torch, pil"):
        DissectConfig(upsample="scipy").validate()


# ---------------------------------------------------------------- 6. --thresholds

def _save(path: Path, values) -> str:
    np.save(path, np.asarray(values))
    return str(path)


def test_given_thresholds_reproduce_a_computed_run(tiny: Path, tmp_path: Path) -> None:
    own = _run(tiny, tmp_path / "own", layers=["maps", "down"])
    files = [f"{n}={tmp_path / 'own' / n / 'thresholds.npy'}" for n in ("maps", "down")]
    given = _run(tiny, tmp_path / "given", layers=["maps", "down"], thresholds=files)
    for name in ("maps", "down"):
        a, b = own.result.layer(name), given.result.layer(name)
        for field in ("intersection", "activation", "truth", "iou"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (name, field)
        assert np.array_equal(a.top_indices, b.top_indices)  # stage 1 still keeps top images
        assert (tmp_path / "own" / name / "tally.csv").read_bytes() == \
            (tmp_path / "given" / name / "tally.csv").read_bytes()
    entries = {e["name"]: e for e in given.summary_json["layers"]}
    record = entries["maps"]["thresholds_given"]
    file = tmp_path / "own" / "maps" / "thresholds.npy"
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() and record["dtype"] == "float32"
    assert given.summary_json["options"]["thresholds"] == files
    assert all(e["thresholds_given"] is None for e in own.summary_json["layers"])
    assert not (tmp_path / "own" / "maps" / "thresholds_given.npy").exists()


def test_given_float64_thresholds_keep_their_precision_with_pil(tiny: Path, tmp_path: Path) -> None:
    # unit 0 is exactly 0.5 everywhere: a float64 threshold a hair below fires on every pixel,
    # its float32 rounding (0.5 itself) on none
    t64 = np.array([0.5 - 1e-12, 0.4], dtype=np.float64)
    f64 = _save(tmp_path / "t64.npy", t64)
    f32 = _save(tmp_path / "t32.npy", t64.astype(np.float32))
    pixels = 7 * 4 * 4
    exact = _run(tiny, tmp_path / "a", upsample="pil", thresholds=[f64]).result.layer("maps")
    rounded = _run(tiny, tmp_path / "b", upsample="pil", thresholds=[f32]).result.layer("maps")
    torch_mode = _run(tiny, tmp_path / "c", thresholds=[f64]).result.layer("maps")
    assert exact.intersection[0, 1:4].sum() == pixels  # every pixel carries one colour label (ids 1-3)
    assert rounded.intersection[0].sum() == 0
    assert torch_mode.intersection[0].sum() == 0  # torch's engine compares in float32 (documented)
    assert np.array_equal(np.load(tmp_path / "a" / "maps" / "thresholds_given.npy"), t64)
    assert np.load(tmp_path / "a" / "maps" / "thresholds.npy").dtype == np.float32
    units = json.loads((tmp_path / "a" / "maps" / "units.json").read_text())["units"]
    assert units[0]["threshold"] == 0.5 - 1e-12  # the value used, not its float32 rounding


def test_given_thresholds_skip_the_quantile_and_key_the_result(tiny: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dissect import pipeline

    built: list[int] = []
    original = pipeline.TopQuantile.__init__

    def counting(self, num_units, *args, **kwargs):
        built.append(num_units)
        original(self, num_units, *args, **kwargs)

    monkeypatch.setattr(pipeline.TopQuantile, "__init__", counting)
    file = tmp_path / "t.npy"
    _save(file, [0.25, 0.5])
    first = _run(tiny, tmp_path / "out", layers=["maps", "down"], thresholds=[f"maps={file}"])
    assert built == [2]  # one TopQuantile: for 'down' only
    again = _run(tiny, tmp_path / "out", layers=["maps", "down"], thresholds=[f"maps={file}"])
    assert again.reused
    (tmp_path / "out" / "maps" / "thresholds_given.npy").unlink()  # a damaged result is not reused
    repaired = _run(tiny, tmp_path / "out", layers=["maps", "down"], thresholds=[f"maps={file}"])
    assert not repaired.reused and (tmp_path / "out" / "maps" / "thresholds_given.npy").is_file()
    _save(file, [0.25, 0.75])  # same path, other values: another result
    changed = _run(tiny, tmp_path / "out", layers=["maps", "down"], thresholds=[f"maps={file}"])
    assert not changed.reused and changed.summary_json["run_key"] != first.summary_json["run_key"]
    assert changed.summary_json["layers"][0]["thresholds_given"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


@pytest.mark.parametrize("spec, message", [
    ("maps={bad}", r"--thresholds maps=.*bad\.npy: shape \(3,\); expected a \.npy array of shape \(2,\): one "
                   r"threshold per unit of maps"),
    ("nope={good}", r"--thresholds nope=.*: layer 'nope' is not dissected; dissected layers: maps, down"),
    ("{good}", r"--thresholds .*good\.npy: a plain FILE needs exactly one dissected layer, but 2 are dissected"),
    ("=x.npy", r"--thresholds '=x\.npy': expected LAYER=FILE"),
    ("maps={missing}", r"--thresholds maps=.*missing\.npy: no such file; expected a \.npy array of shape "
                       r"\(units,\): one threshold per unit of the layer"),
    ("maps={nan}", r"--thresholds maps=.*nan\.npy: 1 non-finite value\(s\), e.g. unit 1"),
    ("maps={text}", r"--thresholds maps=.*text\.npy: not a readable \.npy file"),
])
def test_threshold_file_errors_name_flag_file_and_shape(tiny: Path, tmp_path: Path, spec: str, message: str) -> None:
    paths = {"bad": _save(tmp_path / "bad.npy", [1.0, 2.0, 3.0]), "good": _save(tmp_path / "good.npy", [1.0, 2.0]),
             "missing": str(tmp_path / "missing.npy"), "nan": _save(tmp_path / "nan.npy", [1.0, np.nan])}
    (tmp_path / "text.npy").write_text("not numpy")
    paths["text"] = str(tmp_path / "text.npy")
    with pytest.raises(InputError, match=message):
        _run(tiny, tmp_path / "out", layers=["maps", "down"], thresholds=[spec.format(**paths)])


# ---------------------------------------------------------------- reports with empty labels

def test_report_shows_empty_labels_as_none(tmp_path: Path) -> None:
    from results_fixture import make_results_dir
    from reports.render import render_report

    results = make_results_dir(tmp_path, seed=1)
    path = results / "conv1" / "units.json"
    units = json.loads(path.read_text())
    unit = units["units"][0]
    unit["label"] = ""
    for entry in unit["per_category"].values():
        entry["label"] = ""
    path.write_text(json.dumps(units))
    render_report(results)
    page = (results / "report" / "conv1.html").read_text()
    card = page[page.index(f'id="unit-{unit["unit"]}"'):]
    card = card[:card.index("</article>")]
    assert 'data-label="(none)"' in card and '<span class="label">(none)</span>' in card
    assert "<td>(none)</td>" in card
