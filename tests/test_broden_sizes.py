"""index.csv's ih/iw and sh/sw against the files, and one size per batch, the same with and without the cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broden.cache import build_cache, open_cache
from broden.dataset import BrodenDataset, collate
from broden.errors import BrodenFormatError, InputError
from broden.writer import BrodenWriter
from broden_fixtures import make_tiny_broden


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    return make_tiny_broden(tmp_path / "broden")


def _sizes(root: Path, old: str, new: str, lines: set[int] | None = None) -> None:
    """Replace the ih,iw,sh,sw cells `old` by `new` on the given 1-based lines (default: every row)."""
    index = root / "index.csv"
    out = []
    for n, text in enumerate(index.read_text().splitlines(keepends=True), start=1):
        if n > 1 and (lines is None or n in lines):
            assert f",{old}," in text, (n, text)
            text = text.replace(f",{old},", f",{new},", 1)
        out.append(text)
    index.write_text("".join(out))


def _says(error: pytest.ExceptionInfo, root: Path, *words: str) -> None:
    msg = str(error.value)
    for w in [str(root / "index.csv"), *words]:
        assert w in msg, (w, msg)


# --- item 3: the index's sizes are checked against the decoded files ---------------------------

def test_image_size_disagreeing_with_ih_iw_without_cache(root):
    _sizes(root, "8,8,4,4", "9,8,4,4")
    ds = BrodenDataset(root, cache="off")
    with pytest.raises(BrodenFormatError) as e:
        ds[3]
    _says(e, root, "line 5", "synthetic/img3.png", "8x8", "ih x iw = 9x8")


def test_image_size_disagreeing_with_ih_iw_in_cache_build(root):
    _sizes(root, "8,8,4,4", "8,7,4,4")
    with pytest.raises(BrodenFormatError) as e:
        build_cache(root, progress=False, workers=1)
    _says(e, root, "line 2", "synthetic/img0.png", "8x8", "ih x iw = 8x7")
    assert open_cache(root) is None  # nothing half-built is left to be read


def test_label_size_disagreeing_with_sh_sw_in_both_paths(root):
    _sizes(root, "8,8,4,4", "8,8,4,5")
    with pytest.raises(BrodenFormatError) as e:
        BrodenDataset(root, cache="off")[0]
    _says(e, root, "line 2", "img0_color.png", "4x4", "sh x sw = 4x5")
    with pytest.raises(BrodenFormatError) as e:
        build_cache(root, progress=False, workers=1)
    _says(e, root, "line 2", "img0_color.png", "4x4", "sh x sw = 4x5")
    assert open_cache(root) is None


# --- item 4: one size per batch, said the same way with and without the cache -----------------

def _mixed(root: Path, image_sizes: list[int], label_sizes: list[int]) -> Path:
    w = BrodenWriter(root, ["color", "object"])
    w.add_label(1, "red")
    rng = np.random.default_rng(7)
    for k, (s, ls) in enumerate(zip(image_sizes, label_sizes)):
        w.add_image(f"im{k}", rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
                    layers={"object": [np.ones((ls, ls), dtype=np.int32)]})
    w.close()
    return root


def test_images_of_different_sizes_in_one_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    root = _mixed(tmp_path / "b", [4, 4, 6, 4], [2, 2, 2, 2])
    ds = BrodenDataset(root, cache="off")
    assert ds.get_batch([0, 1, 3])["image"].shape == (3, 3, 4, 4)  # rows of one size batch fine
    with pytest.raises(BrodenFormatError) as e:
        ds.get_batch([0, 2])
    same = "line 4: image 'synthetic/im2.png' is 6x6 (ih x iw) but line 2 (image 'synthetic/im0.png') is 4x4"
    _says(e, root, same, "a batch needs one image size")
    with pytest.raises(BrodenFormatError) as e:
        build_cache(root, progress=False)
    _says(e, root, same, "the decoded cache needs one image size")


def test_label_maps_of_different_sizes_in_one_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    root = _mixed(tmp_path / "b", [4, 4, 4], [2, 3, 2])
    ds = BrodenDataset(root, cache="off")
    with pytest.raises(BrodenFormatError) as e:
        ds.get_batch([2, 1])
    same = ("line 3: image 'synthetic/im1.png' has label maps of 3x3 (sh x sw) but line 4 "
            "(image 'synthetic/im2.png') has 2x2")
    _says(e, root, same, "a batch needs one label size")
    with pytest.raises(BrodenFormatError) as e:
        build_cache(root, progress=False)
    _says(e, root, "line 3: image 'synthetic/im1.png' has label maps of 3x3 (sh x sw) but line 2",
          "the decoded cache needs one label size")


def test_collate_names_the_rows_that_differ(tmp_path):
    root = _mixed(tmp_path / "b", [4, 6], [2, 3])
    ds = BrodenDataset(root, cache="off")
    with pytest.raises(InputError) as e:
        collate([ds[0], ds[1]])
    assert "images differ" in str(e.value) and "row 1" in str(e.value) and "row 0" in str(e.value)
    b = dict(ds[1])
    b["image"] = ds[0]["image"]
    with pytest.raises(InputError) as e:
        collate([ds[0], b])
    assert "label maps differ" in str(e.value) and "row 1" in str(e.value)
