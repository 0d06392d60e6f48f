"""broden.dataset: items against the written fixture, selection options, collate, get_batch, decode errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from broden.dataset import BrodenDataset, collate
from broden.errors import BrodenFormatError, InputError
from broden_fixtures import TINY_CATEGORIES, make_tiny_broden, tiny_broden_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_broden(tmp_path_factory.mktemp("tiny") / "broden")


def _expected(row: dict, categories: list[str]) -> tuple[np.ndarray, list[int]]:
    """Planes and image-level ids of a spec row for the selected categories, in category.csv order."""
    planes = [p for c in TINY_CATEGORIES if c in categories for p in row["layers"].get(c, [])]
    ids = [n for c in TINY_CATEGORIES if c in categories for n in row["image_labels"].get(c, [])]
    return (np.stack(planes) if planes else np.zeros((0, 4, 4), dtype=np.int32)), ids


def test_items_match_what_was_written(tiny):
    ds = BrodenDataset(tiny, cache="off")
    spec = tiny_broden_spec()
    assert len(ds) == len(spec)
    for i, row in enumerate(spec):
        item = ds[i]
        assert set(item) == {"index", "image", "labels", "image_labels"}
        assert item["index"] == i
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 8, 8)
        want = torch.from_numpy(row["image"]).permute(2, 0, 1)
        if row["image_format"] == "png":
            assert torch.equal(item["image"], want)
        else:  # JPEG is lossy: compare with PIL's own decoding of the file, laid out by hand
            pil = np.asarray(Image.open(tiny / "images" / f"synthetic/{row['name']}.jpg").convert("RGB"))
            assert torch.equal(item["image"], torch.from_numpy(pil.copy()).permute(2, 0, 1))
        planes, ids = _expected(row, TINY_CATEGORIES)
        assert item["labels"].dtype == torch.int32
        np.testing.assert_array_equal(item["labels"].numpy(), planes)
        assert item["image_labels"].dtype == torch.int64
        assert item["image_labels"].tolist() == ids
    assert int(ds[0]["labels"].max()) == 300  # an id above 255 survives
    assert ds[0]["image_labels"].tolist() == [400, 314, 194]


def test_category_selection(tiny):
    spec = tiny_broden_spec()
    parts = BrodenDataset(tiny, categories=["part"], cache="off")
    assert parts[0]["labels"].shape == (2, 4, 4)
    np.testing.assert_array_equal(parts[0]["labels"].numpy(), np.stack(spec[0]["layers"]["part"]))
    assert parts[0]["image_labels"].shape == (0,)
    assert parts[1]["labels"].shape == (0, 4, 4)  # img1 has no part layer
    # image-level categories only: K = 0, order is category.csv's whatever the order asked
    scene_tex = BrodenDataset(tiny, categories=["texture", "scene"], cache="off")
    assert scene_tex.categories == ["scene", "texture"]
    assert scene_tex[0]["labels"].shape == (0, 4, 4)
    assert scene_tex[0]["image_labels"].tolist() == [400, 314, 194]
    mixed = BrodenDataset(tiny, categories=["material", "object"], cache="off")
    for i, row in enumerate(spec):
        planes, ids = _expected(row, ["object", "material"])
        np.testing.assert_array_equal(mixed[i]["labels"].numpy(), planes)
        assert ids == [] and mixed[i]["image_labels"].numel() == 0


def test_split_and_limit(tiny):
    val = BrodenDataset(tiny, split="val", cache="off")
    assert val.rows.tolist() == [2, 3, 5]
    assert [val[i]["index"] for i in range(len(val))] == [2, 3, 5]
    assert BrodenDataset(tiny, split="train", cache="off").rows.tolist() == [0, 1, 4, 6]
    assert BrodenDataset(tiny, split="val", limit=2, cache="off").rows.tolist() == [2, 3]
    assert BrodenDataset(tiny, limit=3, cache="off").rows.tolist() == [0, 1, 2]
    assert len(BrodenDataset(tiny, limit=0, cache="off")) == 0
    with pytest.raises(IndexError):
        val[3]


@pytest.mark.parametrize("kwargs, words", [
    ({"categories": ["object", "nope"]}, ["categories", "'nope'", "category.csv"]),
    ({"split": "test"}, ["split", "'test'", "train", "val"]),
    ({"limit": -1}, ["limit", "-1"]),
])
def test_bad_options(tiny, kwargs, words):
    with pytest.raises(InputError) as e:
        BrodenDataset(tiny, cache="off", **kwargs)
    for w in words:
        assert w in str(e.value)


def test_collate_pads_with_zeros(tiny):
    ds = BrodenDataset(tiny, cache="off")
    items = [ds[3], ds[0], ds[1]]  # K = 1, 5, 2; M = 0, 3, 1
    batch = collate(items)
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [3, 0, 1]
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert batch["labels"].shape == (3, 5, 4, 4) and batch["labels"].dtype == torch.int32
    assert batch["image_labels"].shape == (3, 3) and batch["image_labels"].dtype == torch.int64
    for b, item in enumerate(items):
        k, m = item["labels"].shape[0], item["image_labels"].shape[0]
        assert torch.equal(batch["image"][b], item["image"])
        assert torch.equal(batch["labels"][b, :k], item["labels"])
        assert not batch["labels"][b, k:].any()
        assert torch.equal(batch["image_labels"][b, :m], item["image_labels"])
        assert not batch["image_labels"][b, m:].any()
    assert batch["image_labels"].tolist() == [[0, 0, 0], [400, 314, 194], [401, 0, 0]]


def test_collate_rejects_mixed_sizes(tiny):
    ds = BrodenDataset(tiny, cache="off")
    a, b = ds[0], dict(ds[1])
    b["image"] = torch.zeros((3, 6, 6), dtype=torch.uint8)
    with pytest.raises(InputError, match="images differ"):
        collate([a, b])
    with pytest.raises(InputError):
        collate([])


def test_get_batch_equals_collate(tiny):
    ds = BrodenDataset(tiny, categories=["object", "part", "texture"], cache="off")
    order = [6, 0, 3, 2]
    batch = ds.get_batch(order)
    want = collate([ds[i] for i in order])
    assert batch.keys() == want.keys()
    for k in want:
        assert batch[k].dtype == want[k].dtype and torch.equal(batch[k], want[k]), k


def test_decode_errors_name_png_and_row(tmp_path, monkeypatch):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tiny_broden(tmp_path / "broden")
    Image.fromarray(np.zeros((3, 4, 3), dtype=np.uint8)).save(root / "images/synthetic/img2_part.png")
    (root / "images/synthetic/img6_part_2.png").unlink()
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 3  # id 768: not in label.csv
    Image.fromarray(rgb).save(root / "images/synthetic/img1_color.png")
    ds = BrodenDataset(root)  # cache="auto": the missing PNG must not fail the lookup itself
    assert ds.cache is None
    for i, words in [(2, ["line 4", "img2_part.png", "3x4"]), (6, ["line 8", "img6_part_2.png"]),
                     (1, ["line 3", "img1_color.png", "768"])]:
        with pytest.raises(BrodenFormatError) as e:
            ds[i]
        for w in ["index.csv"] + words:
            assert w in str(e.value), (w, str(e.value))
    # a category selection that avoids the broken layer decodes fine
    assert BrodenDataset(root, categories=["object"], cache="off")[2]["labels"].shape == (0, 4, 4)
