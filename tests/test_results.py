"""Result files: Lite's tally.csv byte for byte, units.json, iou.npy order, and atomic writing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dissect import results as results_mod
from dissect.labels import label_units, layer_label_summary
from dissect.results import DatasetInfo, DissectionResult, LayerResult, write_results
from dissect.stats import iou_from_counts

ALL_CATS = ["color", "object", "scene"]
# ids: 1 red, 2 green (color); 300 car (object); 301 unused; 302 kitchen (scene)
LABEL_CAT = np.full(303, -1)
LABEL_CAT[[1, 2]] = 0
LABEL_CAT[300] = 1
LABEL_CAT[302] = 2
NAMES = [""] * 303
NAMES[0], NAMES[1], NAMES[2], NAMES[300], NAMES[302] = "-", "red", "green", "car", "kitchen"


def make_result(categories=("color", "object", "scene")) -> DissectionResult:
    ds = DatasetInfo(root="/data/b", fingerprint="f" * 8, num_images=3, categories=list(categories),
                     all_categories=ALL_CATS, label_names=NAMES, label_category=LABEL_CAT,
                     images=["a/0.jpg", "a/1.jpg", "a/2.jpg"])
    U = 3
    I = np.zeros((U, 303), np.int64)
    A = np.zeros((U, 3), np.int64)
    G = np.zeros(303, np.int64)
    G[1], G[2], G[300], G[302] = 100, 50, 40, 256
    I[0, 1], A[0, 0] = 80, 100          # red: 80 / (100 + 100 - 80) = 2/3
    I[0, 300], A[0, 1] = 10, 90         # car: 10 / (90 + 40 - 10) = 1/12
    I[1, 302], A[1, 2] = 20, 64         # kitchen: 20 / (64 + 256 - 20) = 1/15
    # unit 2: nothing
    sel = ds.selected_label_category()
    iou = iou_from_counts(I, A, G, LABEL_CAT)
    iou = np.where(sel[None, :] >= 0, iou, 0.0)
    lab = label_units(iou, sel, ds.categories)
    lr = LayerResult(name="features.0", shape=(U, 2, 2), thresholds=np.array([0.5, 1.25, 2.0], np.float32),
                     intersection=I, activation=A, truth=G, iou=iou,
                     top_indices=np.array([[2, 0], [1, 2], [0, 1]]), top_scores=np.ones((U, 2), np.float32),
                     top_maps=np.zeros((U, 2, 2, 2), np.float16), labels=lab, counts=layer_label_summary(lab))
    return DissectionResult(options={"top_k": 2}, seed=0, model={"fingerprint": "m"}, dataset=ds, layers=[lr],
                            versions={}, timings={"tally": 1.0}, run_key="k")


def test_iou_from_counts_matches_the_formula():
    rng = np.random.default_rng(0)
    I = rng.integers(0, 50, (4, 303))
    A = rng.integers(50, 100, (4, 3))
    G = rng.integers(50, 100, 303)
    iou = iou_from_counts(I, A, G, LABEL_CAT)
    for u in range(4):
        for l in (1, 2, 300, 302):
            assert iou[u, l] == I[u, l] / (A[u, LABEL_CAT[l]] + G[l] - I[u, l] + 1e-10)
        assert iou[u, 0] == 0 and iou[u, 301] == 0


def test_tally_csv_is_lites_format(tmp_path):
    write_results(make_result(), tmp_path)
    raw = (tmp_path / "features.0" / "tally.csv").read_bytes()
    red, car, kit = 80 / (200 - 80 + 1e-10), 10 / (130 - 10 + 1e-10), 20 / (320 - 20 + 1e-10)
    expected = (
        "unit,category,label,score,color-label,color-truth,color-activation,color-intersect,color-iou,"
        "object-label,object-truth,object-activation,object-intersect,object-iou,"
        "scene-label,scene-truth,scene-activation,scene-intersect,scene-iou\r\n"
        f"1,color,red,{red!r},red,100.0,100.0,80.0,{red!r},car,40.0,90.0,10.0,{car!r},,0.0,0.0,0.0,0.0\r\n"
        # a category without an overlapping label: Lite's id 0, named '' (label.csv has no 0), with the
        # activation of the last selected category (Lite's primary category of id 0): scene's 64
        f"2,scene,kitchen,{kit!r},,0.0,64.0,0.0,0.0,,0.0,64.0,0.0,0.0,kitchen,256.0,64.0,20.0,{kit!r}\r\n"
        "3,scene,,0.0,,0.0,0.0,0.0,0.0,,0.0,0.0,0.0,0.0,,0.0,0.0,0.0,0.0\r\n")
    assert raw.decode() == expected


def test_tally_csv_names_label_zero_when_label_csv_does():
    res = make_result()
    res.dataset.zero_named = True  # label.csv has a row for 0, named '-' here: Lite writes its name
    text = results_mod.tally_csv_text(res.layers[0], res.dataset)
    assert text.splitlines()[-1] == "3,scene,-,0.0,-,0.0,0.0,0.0,0.0,-,0.0,0.0,0.0,0.0,-,0.0,0.0,0.0,0.0"


def test_tally_csv_ties_and_units_json_keep_dash():
    res = make_result()
    lr = res.layers[0]
    # units 0 and 2 tie at 0: the higher unit first (a stable sort reversed), deterministic
    lr.labels.top_score[0] = 0.0
    rows = [line.split(",")[0] for line in results_mod.tally_csv_text(lr, res.dataset).splitlines()[1:]]
    assert rows == ["2", "3", "1"]
    units = results_mod.units_json(lr, res.dataset, 2)["units"]
    assert units[2]["label"] == "-" and units[2]["per_category"]["object"]["label"] == "-"  # unchanged there


def test_units_json_and_arrays(tmp_path):
    res = make_result(categories=("color", "scene"))
    write_results(res, tmp_path)
    units = json.loads((tmp_path / "features.0" / "units.json").read_text())
    assert units["categories"] == ["color", "scene"] and units["top_k"] == 2
    u0 = units["units"][0]
    assert (u0["unit"], u0["label"], u0["label_id"], u0["category"]) == (0, "red", 1, "color")
    assert u0["threshold"] == 0.5 and u0["group"] is None
    assert u0["per_category"]["color"] == {"label": "red", "label_id": 1, "iou": pytest.approx(2 / 3),
                                           "intersection": 80, "activation": 100, "truth": 100}
    assert [t["image"] for t in u0["top_images"]] == ["a/2.jpg", "a/0.jpg"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [l["id"] for l in summary["labels"]] == [1, 2, 302]  # object not selected
    iou = np.load(tmp_path / "features.0" / "iou.npy")
    assert iou.shape == (3, 3) and iou.dtype == np.float32
    assert iou[0, 0] == np.float32(80 / 120) and iou[1, 2] == np.float32(20 / 300)
    assert summary["layers"][0]["detectors"] == 2
    assert summary["rud_last_two"] is None  # one layer: "the last two layers" do not exist


def test_units_json_writes_one_line_per_unit_and_dumps_json_keeps_json_own_rules(tmp_path):
    from broden._fileio import dumps_json

    write_results(make_result(categories=("color", "scene")), tmp_path)
    text = (tmp_path / "features.0" / "units.json").read_text()
    lines = text.splitlines()
    units = json.loads(text)["units"]
    assert [json.loads(line.rstrip(",")) for line in lines if line.startswith("  {")] == units and len(units) == 3
    odd = {"a": [1, {"b": float("inf"), "c": []}], 3: {}, None: "é", 2.5: (1, [2, {"d": None}])}
    assert dumps_json(odd, depth=None) == dumps_json(odd, depth=9) == json.dumps(odd, indent=1)
    full = json.dumps(odd, indent=1)
    for depth in range(4):  # the same JSON values; containers deeper than `depth` on one line
        shallow = dumps_json(odd, depth)
        assert json.loads(shallow) == json.loads(full) and shallow.count("\n") < full.count("\n"), depth
    assert dumps_json(odd, 0) == json.dumps(odd)
    assert dumps_json(odd, 1).splitlines()[1] == ' "a": [1, {"b": Infinity, "c": []}],'


def test_rud_last_two_and_float32_maps(tmp_path):
    res = make_result(categories=("color", "scene"))
    first = res.layers[0]
    maps = np.full(first.top_maps.shape, 1 / 3, np.float32)  # not a float16 value
    second = LayerResult(**{**first.__dict__, "name": "features.3", "top_maps": maps})
    res.layers.append(second)
    write_results(res, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # two layers of 3 units, 2 top-label unique detectors each (red, kitchen): 4 / 6
    assert summary["rud_last_two"]["top_label"] == pytest.approx(4 / 6)
    stored = np.load(tmp_path / "features.3" / "top_activations.npy")
    assert stored.dtype == np.float32 and np.array_equal(stored, maps)


def test_failed_write_leaves_no_summary(tmp_path, monkeypatch):
    res = make_result()
    res.layers.append(res.layers[0])
    res.layers[1] = LayerResult(**{**res.layers[0].__dict__, "name": "features.3"})
    calls = {"n": 0}
    real = results_mod.units_json

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(results_mod, "units_json", flaky)
    with pytest.raises(OSError):
        write_results(res, tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert (tmp_path / "features.0" / "units.json").exists()
    assert not (tmp_path / "features.3" / "units.json").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temp leftovers


def test_rewrite_removes_stale_report_and_layer_folders(tmp_path):
    # an earlier run of layers features.0 and conv1, with a rendered report
    res = make_result()
    old = LayerResult(**{**res.layers[0].__dict__, "name": "conv1"})
    res.layers.append(old)
    write_results(res, tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("<html>old</html>")
    # user files and folders that are not ours survive
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "readme.txt").write_text("mine")
    assert (tmp_path / "conv1" / "tally.csv").is_file()

    write_results(make_result(), tmp_path)  # the new run: features.0 only
    assert not (tmp_path / "conv1").exists()
    assert not (tmp_path / "report").exists()
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert (tmp_path / "readme.txt").read_text() == "mine"
    assert (tmp_path / "features.0" / "units.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [layer["name"] for layer in summary["layers"]] == ["features.0"]


def test_remove_stale_outputs_keeps_requested_layers(tmp_path):
    for name, marker in (("a", "units.json"), ("b", "tally.csv"), ("c", "thresholds.npy"), ("d", "other.txt")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("x")
    removed = results_mod.remove_stale_outputs(tmp_path, ["a"])
    assert sorted(p.name for p in removed) == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"]
    assert results_mod.remove_stale_outputs(tmp_path / "absent", ["a"]) == []


def test_label_strips_in_units_json_files_and_missing_outputs(tmp_path):
    res = make_result()
    lr = res.layers[0]
    lr.label_top_indices = np.array([[1, 2], [2, 0], [0, 1]])
    lr.label_top_intersections = np.array([[30, 4], [7, 0], [0, 0]])  # 0: an empty slot
    lr.label_top_maps = np.arange(3 * 2 * 2 * 2, dtype=np.float64).reshape(3, 2, 2, 2)
    write_results(res, tmp_path)
    units = json.loads((tmp_path / "features.0" / "units.json").read_text())["units"]
    assert units[0]["label_top_images"] == [{"index": 1, "image": "a/1.jpg", "intersection": 30},
                                            {"index": 2, "image": "a/2.jpg", "intersection": 4}]
    assert units[1]["label_top_images"] == [{"index": 2, "image": "a/2.jpg", "intersection": 7}]
    assert units[2]["label_top_images"] == []
    maps = np.load(tmp_path / "features.0" / "label_top_activations.npy")
    assert maps.dtype == np.float32 and np.array_equal(maps, lr.label_top_maps)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert results_mod.missing_outputs(tmp_path, summary) == []
    (tmp_path / "features.0" / "label_top_activations.npy").unlink()
    assert results_mod.missing_outputs(tmp_path, summary) == [tmp_path / "features.0" / "label_top_activations.npy"]
    # a run with --label-strips off needs no such file (and a rewrite removes an earlier one)
    assert results_mod.missing_outputs(tmp_path, {**summary, "options": {"label_strips": "off"}}) == []
    write_results(res, tmp_path)
    lr.label_top_indices = lr.label_top_intersections = lr.label_top_maps = None
    write_results(res, tmp_path)
    assert not (tmp_path / "features.0" / "label_top_activations.npy").exists()
    units = json.loads((tmp_path / "features.0" / "units.json").read_text())["units"]
    assert all(u["label_top_images"] is None for u in units)
