"""Tests of broden.synthetic: the CGL synthetic shapes dataset in Broden format."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as connected_components

from broden.errors import InputError
from broden.synthetic import generate_shapes_dataset, load_classes
from dissect.cli import main as cli_main

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
COLOR_ID = {"red": 1, "green": 2, "blue": 3}
SHAPE_ID = {"square": 4, "circle": 5, "triangle": 6}
CATS = ("color", "shape", "color_shape")


def _decode(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path)).astype(np.int64)
    return a[..., 0] + 256 * a[..., 1]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _load(root: Path):
    """Yield (index row, image (S, S, 3), {cat: (S/2, S/2) ids}) read straight from disk."""
    for row in _read_csv(root / "index.csv"):
        img = np.asarray(Image.open(root / "images" / row["image"]).convert("RGB"))
        yield row, img, {c: _decode(root / "images" / row[c]) for c in CATS}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ds64(tmp_path_factory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("s") / "ds64", per_class=1, size=64, seed=3,
                                   progress=False)


@pytest.fixture(scope="module")
def ds32(tmp_path_factory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("s") / "ds32", per_class=2, size=32, seed=0,
                                   progress=False)


def test_deterministic_for_a_seed(ds32, tmp_path):
    again = generate_shapes_dataset(tmp_path / "again", per_class=2, size=32, seed=0, progress=False)
    a, b = _files(ds32), _files(again)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert any(f.endswith(".png") for f in a) and not any(f.endswith(".jpg") for f in a)
    other = _files(generate_shapes_dataset(tmp_path / "other", per_class=2, size=32, seed=1, progress=False))
    changed = [k for k in a if k.endswith(".png") and a[k] != other.get(k)]
    assert len(changed) > len(a) // 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_two_shapes_one_per_half_pure_colours(ds64):
    n = 0
    for row, img, _ in _load(ds64):
        s = img.shape[0]
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours <= {(255, 255, 255), *COLORS.values()}
        for half in (img[: s // 2], img[s // 2:]):
            ink = (half != 255).any(axis=2)
            assert connected_components(ink, connectivity=2).max() == 1  # exactly one shape
            assert len({tuple(c) for c in half[ink]}) == 1               # of one colour
            ys, xs = np.nonzero(ink)
            assert 12 <= np.ptp(ys) + 1 <= 13 and 12 <= np.ptp(xs) + 1 <= 13  # ~13 px across at 64
        n += 1
    assert n == 45


def _shape_from_pixels(ink: np.ndarray) -> str:
    """Classify one shape by how much of its bounding box it fills (1, pi/4, 1/2)."""
    ys, xs = np.nonzero(ink)
    fill = ink.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


@pytest.mark.parametrize("which", ["ds64", "ds32"])
def test_label_maps_align_with_pixels(which, request):
    root = request.getfixturevalue(which)
    label_px = {c: 0 for c in COLORS}
    image_px = {c: 0 for c in COLORS}
    covered = {c: 0 for c in COLORS}  # image pixels of colour c inside label pixels of colour c
    for row, img, lab in _load(root):
        s = img.shape[0]
        assert lab["color"].shape == (s // 2, s // 2) == (int(row["sh"]), int(row["sw"]))
        ink_block = (img != 255).any(axis=2).reshape(s // 2, 2, s // 2, 2).sum(axis=(1, 3))
        for name, rgb in COLORS.items():
            is_c = (img == rgb).all(axis=2)
            block = is_c.reshape(s // 2, 2, s // 2, 2).sum(axis=(1, 3))  # (S/2, S/2) in 0..4
            lab_c = lab["color"] == COLOR_ID[name]
            # every label pixel of colour c covers pixels of colour c and of no other colour
            assert (block[lab_c] >= 1).all() and (ink_block[lab_c] == block[lab_c]).all()
            # every 2x2 block entirely of colour c is labelled c (shape interiors)
            assert lab_c[block == 4].all()
            label_px[name] += int(lab_c.sum())
            image_px[name] += int(is_c.sum())
            covered[name] += int(block[lab_c].sum())
        # the three layers cover the same pixels and agree on the combination id
        on = lab["color"] > 0
        assert np.array_equal(on, lab["shape"] > 0) and np.array_equal(on, lab["color_shape"] > 0)
        combo = 7 + 3 * (lab["color"] - 1) + (lab["shape"] - 4)
        assert np.array_equal(lab["color_shape"][on], combo[on])
        # the shape id matches the shape seen in the pixels, half by half
        for h in (slice(0, s // 2), slice(s // 2, s)):
            ink = (img[h] != 255).any(axis=2)
            shape_half = lab["shape"][h.start // 2: h.stop // 2]
            assert np.unique(shape_half).tolist() == [0, SHAPE_ID[_shape_from_pixels(ink)]]
            if shape_half.max() == SHAPE_ID["square"]:
                # a filled axis-aligned block: exactly the label pixels whose centres (image
                # coordinates 2v+1) fall inside the square's pixel extent [a, b + 1)
                ys, xs = np.nonzero(ink)
                v = 2 * np.arange(s // 4) + 1 + h.start
                rows = (v >= ys.min() + h.start) & (v <= ys.max() + h.start)
                u = 2 * np.arange(s // 2) + 1
                cols = (u >= xs.min()) & (u <= xs.max())
                assert np.array_equal(shape_half > 0, rows[:, None] & cols[None, :])
            if shape_half.max() == SHAPE_ID["triangle"]:  # apex up: rows widen downwards
                widths = ink.sum(axis=1)[ink.any(axis=1)]
                assert widths[0] <= 2 and widths[-1] == widths.max()
    for name in COLORS:
        assert 0.85 < label_px[name] / (image_px[name] / 4) < 1.15
        assert covered[name] / (4 * label_px[name]) > 0.8  # label pixels are mostly of their colour


def test_classes_csv_matches_label_maps_and_index(ds64, ds32):
    for root, per_class in ((ds64, 1), (ds32, 2)):
        classes = _read_csv(root / "classes.csv")
        index = _read_csv(root / "index.csv")
        assert list(classes[0]) == ["image", "split", "class45", "class45_name", "binary"]
        assert [r["image"] for r in classes] == [r["image"] for r in index]
        assert [r["split"] for r in classes] == [r["split"] for r in index]
        names = [f"{c}_{s}" for c in COLORS for s in SHAPE_ID]
        pairs = [(i, j) for i in range(9) for j in range(i, 9)]
        seen = {}
        for cls_row, (_, _, lab) in zip(classes, _load(root)):
            ids = sorted(int(v) - 7 for v in np.unique(lab["color_shape"]) if v > 0)
            if len(ids) == 1:  # both shapes identical
                ids = ids * 2
            k = pairs.index(tuple(ids))
            assert int(cls_row["class45"]) == k
            assert cls_row["class45_name"] == f"{names[ids[0]]}+{names[ids[1]]}"
            assert int(cls_row["binary"]) == int(4 in np.unique(lab["shape"]))
            seen[k] = seen.get(k, 0) + 1
        assert seen == {k: per_class for k in range(45)}
        n = 45 * per_class
        n_val = sum(r["split"] == "val" for r in classes)
        assert n_val == round(n * 0.2)
        per_class_val = {}
        for r in classes:
            per_class_val[r["class45"]] = per_class_val.get(r["class45"], 0) + (r["split"] == "val")
        lo = math.floor(per_class * 0.2)
        assert set(per_class_val.values()) <= {lo, lo + 1}
        df = load_classes(root)
        assert len(df) == n and df["class45"].dtype == np.int64
        assert df["binary"].tolist() == [int(r["binary"]) for r in classes]


def test_metadata_and_broden_reader(ds64):
    meta = json.loads((ds64 / "synthetic.json").read_text())
    assert meta["parameters"] == {"per_class": 1, "size": 64, "seed": 3, "val_fraction": 0.2,
                                  "shape_size": 13}
    expected = ([(1, "red"), (2, "green"), (3, "blue"), (4, "square"), (5, "circle"), (6, "triangle")]
                + [(7 + 3 * ci + si, f"{c}_{s}") for ci, c in enumerate(COLORS) for si, s in enumerate(SHAPE_ID)])
    assert [(l["id"], l["name"]) for l in meta["labels"]] == expected
    assert len(meta["classes"]) == 45 and meta["classes"][0] == "red_square+red_square"
    # label pixel counts recorded in synthetic.json equal a count over the decoded maps
    counts = {}
    for _, _, lab in _load(ds64):
        for c in CATS:
            for v, k in zip(*np.unique(lab[c][lab[c] > 0], return_counts=True)):
                counts[int(v)] = counts.get(int(v), 0) + int(k)
    assert {i: meta["label_pixels"][nm] for i, nm in expected} == counts

    fmt = pytest.importorskip("broden.format")
    m = fmt.load_meta(ds64, check_files=True)
    assert list(m.categories) == list(CATS)
    assert {i: (lab.name, lab.category) for i, lab in m.labels.items()} == {
        i: (nm, "color" if i <= 3 else "shape" if i <= 6 else "color_shape") for i, nm in expected}
    assert m.num_images == 45
    rec = m.records[0]
    assert [len(rec.layers[c]) for c in CATS] == [1, 1, 1]
    assert np.array_equal(fmt.decode_label_png(m.png_path(rec.layers["shape"][0])),
                          _decode(ds64 / "images" / rec.layers["shape"][0]))


def test_refuses_to_overwrite_and_reuses_identical(ds32, tmp_path):
    before = (ds32 / "synthetic.json").stat().st_mtime_ns
    assert generate_shapes_dataset(ds32, per_class=2, size=32, seed=0, progress=False) == ds32
    assert (ds32 / "synthetic.json").stat().st_mtime_ns == before
    with pytest.raises(InputError, match="pick another directory or delete it"):
        generate_shapes_dataset(ds32, per_class=2, size=32, seed=5, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=str(busy)):
        generate_shapes_dataset(busy, per_class=1, size=32, progress=False)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_shapes_dataset(empty, per_class=1, size=32, progress=False) / "index.csv").is_file()


@pytest.mark.parametrize("kwargs, option", [
    ({"size": 30}, "--size"), ({"size": 8}, "--size"), ({"per_class": 0}, "--per-class"),
    ({"val_fraction": 1.0}, "--val-fraction"), ({"seed": -1}, "--seed"), ({"shape_size": 3}, "--shape-size"),
])
def test_bad_parameters(tmp_path, kwargs, option):
    with pytest.raises(InputError, match=option):
        generate_shapes_dataset(tmp_path / "x", progress=False, **{"per_class": 1, **kwargs})
    assert not (tmp_path / "x").exists()


def test_load_classes_rejects_inconsistent_rows(ds32, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(ds32, root)
    lines = (root / "classes.csv").read_text().splitlines()
    parts = lines[3].split(",")
    parts[3] = "blue_circle+blue_circle" if parts[3] != "blue_circle+blue_circle" else "red_square+red_square"
    lines[3] = ",".join(parts)
    (root / "classes.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 4: column 'class45_name'"):
        load_classes(root)
    (root / "classes.csv").unlink()
    with pytest.raises(InputError, match="classes.csv"):
        load_classes(root)


def test_cli_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--per-class", "1", "--size", "32", "--seed", "2",
                     "--quiet"]) == 0
    text = capsys.readouterr().out
    n_val = sum(r["split"] == "val" for r in _read_csv(out / "classes.csv"))
    assert f"{45 - n_val} train, {n_val} val" in text and str(out / "index.csv") in text
    red = sum(int((lab["color"] == 1).sum()) for _, _, lab in _load(out))
    assert any(line.split()[:2] == ["red", str(red)] for line in text.splitlines())
    assert cli_main(["synth", "--out", str(tmp_path / "bad"), "--size", "33"]) == 2


def test_one_synthetic_dir_for_both_clis(tmp_path, monkeypatch):
    from broden.synthetic import DEFAULT_PER_CLASS, synthetic_dir
    from cgl_train.config import TrainConfig
    from cgl_train.data import synthetic_cache_dir
    from dissect.datasets import SYNTHETIC_DEFAULTS
    from dissect.commands.synth import DEFAULT_PER_CLASS as SYNTH_PER_CLASS

    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "synthetic" / "shapes-pc640-s64-seed0-val0.2"
    assert synthetic_dir() == expected  # honours DISSECT_CACHE_DIR; the paper's defaults
    assert synthetic_dir(tmp_path / "x", per_class=3, size=32, seed=2, val_fraction=0.25) == \
        tmp_path / "x" / "synthetic" / "shapes-pc3-s32-seed2-val0.25"
    # cgl-train's default location is the same resolver's
    assert synthetic_cache_dir(TrainConfig(data="synthetic")) == expected
    cfg = TrainConfig(data="synthetic", synthetic_per_class=3, synthetic_size=32, synthetic_seed=2,
                      synthetic_val_fraction=0.25)
    assert synthetic_cache_dir(cfg) == synthetic_dir(None, 3, 32, 2, 0.25)
    # one default per_class everywhere (the paper's 640)
    assert DEFAULT_PER_CLASS == SYNTH_PER_CLASS == SYNTHETIC_DEFAULTS["per_class"] == \
        TrainConfig().synthetic_per_class == 640


def test_clash_names_the_option_the_user_gave(ds32, capsys):
    from cgl_train.config import TrainConfig
    from cgl_train.data import prepare_synthetic

    # cgl-train --synthetic-dir DS with another per-class
    cfg = TrainConfig(data="synthetic", synthetic_dir=str(ds32), synthetic_per_class=3, synthetic_size=32)
    with pytest.raises(InputError, match=f"^--synthetic-dir {ds32} is not empty") as err:
        prepare_synthetic(cfg, progress=False)
    assert "--out" not in str(err.value)
    # dissect synth --out DS with another per-class
    assert cli_main(["synth", "--out", str(ds32), "--per-class", "3", "--size", "32", "--quiet"]) == 2
    assert f"--out {ds32} is not empty" in capsys.readouterr().err
