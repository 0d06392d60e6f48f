"""broden.format: the reader on every cell form, the primary-category rule, and each format error."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broden.errors import BrodenFormatError, InputError
from broden.format import decode_label_png, load_meta, validate
from broden_fixtures import TINY_CATEGORIES, TINY_LABELS, TINY_PRIMARY, make_tiny_broden, tiny_broden_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_broden(tmp_path_factory.mktemp("tiny") / "broden")


@pytest.fixture
def broken(tmp_path) -> Path:
    """A fresh copy each test may break."""
    return make_tiny_broden(tmp_path / "broden")


def _edit_line(path: Path, line: int, old: str, new: str) -> None:
    """Replace `old` by `new` on 1-based `line` of a text file."""
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line - 1], (old, lines[line - 1])
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def _names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- decode_label_png -------------------------------------------------------------------------

def test_decode_label_png_uses_green_channel_without_overflow(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = [[0, 255, 44], [1, 255, 0]]
    rgb[..., 1] = [[0, 1, 1], [2, 255, 0]]
    rgb[..., 2] = 77  # blue is unused by the format
    Image.fromarray(rgb).save(tmp_path / "l.png")
    got = decode_label_png(tmp_path / "l.png")
    expected = np.array([[0, 255 + 256, 44 + 256], [1 + 512, 255 + 256 * 255, 0]])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


def test_decode_label_png_errors_name_the_file(tmp_path):
    with pytest.raises(BrodenFormatError, match=re.escape(str(tmp_path / "none.png"))):
        decode_label_png(tmp_path / "none.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(BrodenFormatError, match="junk.png"):
        decode_label_png(tmp_path / "junk.png")


# --- the reader on the tiny fixture ----------------------------------------------------------

def test_records_cover_every_cell_form(tiny):
    meta = load_meta(tiny)
    spec = tiny_broden_spec()
    assert meta.categories == TINY_CATEGORIES
    assert len(meta.records) == len(spec)
    for i, (r, row) in enumerate(zip(meta.records, spec)):
        ext = "jpg" if row["image_format"] == "jpg" else "png"
        assert r.index == i and r.line == i + 2
        assert r.image == f"synthetic/{row['name']}.{ext}"
        assert r.split == row["split"]
        assert (r.ih, r.iw, r.sh, r.sw) == (8, 8, 4, 4)
        assert {c: len(v) for c, v in r.layers.items()} == {c: len(v) for c, v in row["layers"].items()}
        assert r.image_labels == {c: v for c, v in row["image_labels"].items() if v}
    # several PNG layers of one category, with Broden's naming
    assert meta.records[0].layers["part"] == ["synthetic/img0_part.png", "synthetic/img0_part_1.png"]
    assert meta.records[6].layers["part"][2] == "synthetic/img6_part_2.png"
    # two image-level ids in one cell ("314;194"), order kept
    assert meta.records[0].image_labels["texture"] == [314, 194]
    # an image with only color: every other cell empty
    assert meta.records[3].layers.keys() == {"color"} and meta.records[3].image_labels == {}


def test_layers_decode_to_the_written_ids(tiny):
    meta = load_meta(tiny)
    for r, row in zip(meta.records, tiny_broden_spec()):
        for c, planes in row["layers"].items():
            for rel, plane in zip(r.layers[c], planes):
                np.testing.assert_array_equal(decode_label_png(meta.png_path(rel)), plane)
    # ids above 255 really travel through G
    glass = np.asarray(Image.open(meta.png_path(meta.records[4].layers["object"][0])))
    assert (glass[..., 1] == 1).any()


def test_labels_and_primary_category(tiny):
    meta = load_meta(tiny)
    assert meta.num_labels == 514
    assert meta.label_names[0] == "-" and meta.label_names[10] == ""
    for number, (name, _) in TINY_LABELS.items():
        assert meta.label_names[number] == name
        assert meta.labels[number].category == TINY_PRIMARY[number]
        assert meta.label_category[number] == TINY_CATEGORIES.index(TINY_PRIMARY[number])
    assert meta.label_category.dtype == np.int64
    assert meta.label_category[0] == -1 and meta.label_category[10] == -1
    assert (meta.label_category >= 0).sum() == len(TINY_LABELS)
    # glass: object 0.6 > material 0.2; tile: a tie goes to the later category
    assert meta.labels[300].coverage == {"object": 0.6, "material": 0.2}
    assert meta.category_labels("object") == [4, 5, 300]
    assert meta.category_labels("material") == [8, 9, 513]
    assert meta.category_labels("texture") == [194, 314]


def test_tie_rule_follows_category_order(broken):
    # put material before object: the tie (tile) now goes to object, the later one
    order = ["color", "material", "object", "part", "scene", "texture"]
    cat = broken / "category.csv"
    rows = cat.read_text().splitlines()
    by_name = {r.split(",")[0]: r for r in rows[1:]}
    cat.write_text("\n".join([rows[0]] + [by_name[c] for c in order]) + "\n")
    index = broken / "index.csv"
    lines = [line.split(",") for line in index.read_text().splitlines()]
    perm = [0, 1, 2, 3, 4, 5] + [6 + TINY_CATEGORIES.index(c) for c in order]
    index.write_text("\n".join(",".join(line[i] for i in perm) for line in lines) + "\n")
    meta = load_meta(broken)
    assert meta.labels[9].category == "object"
    assert meta.labels[300].category == "object"  # not a tie: the larger coverage still wins


def test_validate_clean_fixture(tiny):
    assert validate(tiny, check_files=True, decode=True) == []


# --- errors, each on its own broken copy ------------------------------------------------------

@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_part.csv"])
def test_missing_table(broken, name):
    (broken / name).unlink()
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), str(broken / name), "missing")


@pytest.mark.parametrize("header", [
    "image,split,ih,iw,sh,sw,color,object,part,material,scene",  # a category short
    "image,split,ih,iw,sh,sw,object,color,part,material,scene,texture",  # wrong order
    "img,split,ih,iw,sh,sw,color,object,part,material,scene,texture",  # not Broden's fixed columns
])
def test_index_header_must_be_brodens(broken, header):
    index = broken / "index.csv"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([header] + lines[1:]) + "\n")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), str(index), "line 1", "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture")


def test_non_integer_size(broken):
    _edit_line(broken / "index.csv", 4, ",8,8,4,4,", ",8,8,4x,4,")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), "index.csv", "line 4", "'sh'", "4x")


def test_empty_entry(broken):
    _edit_line(broken / "index.csv", 2, "img0_part.png;synthetic", "img0_part.png;;synthetic")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), "index.csv", "line 2", "'part'", "empty entry")


def test_negative_image_label(broken):
    _edit_line(broken / "index.csv", 3, ",401,", ",-401,")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), "index.csv", "line 3", "'scene'", "-401")


def test_image_label_not_in_label_csv(broken):
    _edit_line(broken / "index.csv", 6, ",400,", ",402,")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), "index.csv", "line 6", "402", "label.csv")


def test_category_table_id_not_in_label_csv(broken):
    path = broken / "c_scene.csv"
    path.write_text(path.read_text() + "3,999,nowhere,1,1\n")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), str(path), "line 4", "999")


def test_missing_image_and_png(broken):
    (broken / "images" / "synthetic" / "img3.png").unlink()
    (broken / "images" / "synthetic" / "img6_part_1.png").unlink()
    load_meta(broken)  # the tables alone are fine
    problems = validate(broken)
    assert len(problems) == 2
    _names(problems[0], "index.csv", "line 5", "synthetic/img3.png")
    _names(problems[1], "index.csv", "line 8", "synthetic/img6_part_1.png", "'part'")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken, check_files=True)
    _names(str(e.value), "line 5", "img3.png")
    with pytest.raises(BrodenFormatError) as e:
        validate(broken, strict=True)
    _names(str(e.value), "img6_part_1.png")


def _rewrite_png(path: Path, ids: np.ndarray) -> None:
    rgb = np.zeros(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    Image.fromarray(rgb).save(path)


def test_png_unknown_id_found_when_decoded(broken):
    _rewrite_png(broken / "images" / "synthetic" / "img1_object.png", np.full((4, 4), 260))
    assert validate(broken, decode=False) == []  # only decoding can see it
    problems = validate(broken, decode=True)
    assert len(problems) == 1
    _names(problems[0], "index.csv", "line 3", "img1_object.png", "260", "label.csv")


def test_png_size_mismatch_found_when_decoded(broken):
    _rewrite_png(broken / "images" / "synthetic" / "img2_material.png", np.full((5, 4), 8))
    problems = validate(broken, decode=True)
    assert len(problems) == 1
    _names(problems[0], "index.csv", "line 4", "img2_material.png", "5x4", "4x4")


def test_format_errors_are_input_errors():
    assert issubclass(BrodenFormatError, InputError)


def test_package_exports_lazily():
    import subprocess
    import sys

    import broden
    import broden.cache
    import broden.dataset
    import broden.format

    assert broden.load_meta is broden.format.load_meta
    assert broden.BrodenDataset is broden.dataset.BrodenDataset
    assert broden.build_cache is broden.cache.build_cache
    with pytest.raises(AttributeError):
        broden.no_such_name
    # `import broden` alone must not pull torch in
    code = "import sys, broden; broden.decode_label_png; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_header_only_index_is_refused(broken):
    index = broken / "index.csv"
    index.write_text(index.read_text().splitlines()[0] + "\n")
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), str(index), "no image rows")
    from broden.dataset import BrodenDataset
    with pytest.raises(BrodenFormatError, match="no image rows"):
        BrodenDataset(broken, cache="off")


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_object.csv"])
def test_non_utf8_bytes_name_the_file_and_line(broken, name):
    path = broken / name
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b",", b",\xff\xfe", 1)  # line 3: Latin-1 junk, not UTF-8
    path.write_bytes(b"".join(lines))
    with pytest.raises(BrodenFormatError) as e:
        load_meta(broken)
    _names(str(e.value), str(path), "line 3", "UTF-8", "0xff")
