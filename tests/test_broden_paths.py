"""Paths in index.csv stay inside the dataset's images/ directory: no '..' escape, no absolute path,
no symbolic link out of it unless the caller allows it explicitly."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import broden.format as format_mod
from broden.dataset import BrodenDataset
from broden.errors import BrodenFormatError
from broden.format import load_meta, validate
from broden_fixtures import make_tiny_broden, tiny_broden_spec

IMG3 = "synthetic/img3.png"  # row 3, line 5 of index.csv
PART = "synthetic/img6_part_1.png"  # row 6, line 8, column 'part'


@pytest.fixture
def root(tmp_path) -> Path:
    return make_tiny_broden(tmp_path / "data" / "broden")


def _replace_in_index(root: Path, old: str, new: str) -> None:
    index = root / "index.csv"
    text = index.read_text()
    assert text.count(old) == 1, old
    index.write_text(text.replace(old, new))


def _outside_copy(root: Path, rel: str) -> Path:
    """Copy images/<rel> to a file outside the dataset; return its path."""
    out = root.parent.parent / "outside" / Path(rel).name
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "images" / rel, out)
    return out


def _refused(root: Path, line: int, *words: str, **kwargs) -> str:
    with pytest.raises(BrodenFormatError) as e:
        load_meta(root, **kwargs)
    msg = str(e.value)
    for w in [str(root / "index.csv"), f"line {line}", *words]:
        assert w in msg, (w, msg)
    return msg


@pytest.mark.parametrize("rel", ["../../../outside/img3.png", "synthetic/../../../../outside/img3.png"])
def test_dotdot_escape_is_refused(root, rel):
    _outside_copy(root, IMG3)  # a file really there: today it would be read
    _replace_in_index(root, IMG3, rel)
    _refused(root, 5, repr(rel), "images")
    with pytest.raises(BrodenFormatError):
        BrodenDataset(root, cache="off")


def test_absolute_path_is_refused_even_with_links_allowed(root):
    out = _outside_copy(root, IMG3)
    _replace_in_index(root, IMG3, str(out))
    _refused(root, 5, repr(str(out)), "relative")
    _refused(root, 5, repr(str(out)), allow_outside_links=True)


def test_png_escape_is_refused_naming_the_column(root):
    _outside_copy(root, PART)
    _replace_in_index(root, PART, "../../../outside/img6_part_1.png")
    _refused(root, 8, "'part'", "img6_part_1.png")


def test_dotdot_that_stays_inside_is_accepted(root):
    _replace_in_index(root, IMG3, "synthetic/../synthetic/img3.png")
    ds = BrodenDataset(root, cache="off")
    want = torch.from_numpy(tiny_broden_spec()[3]["image"]).permute(2, 0, 1)
    assert torch.equal(ds[3]["image"], want)


def test_symlinked_file_out_of_the_root(root):
    out = _outside_copy(root, IMG3)
    link = root / "images" / IMG3
    link.unlink()
    link.symlink_to(out)
    msg = _refused(root, 5, repr(IMG3), str(out.resolve()), "allow_outside_links")
    assert "symbolic link" in msg
    with pytest.raises(BrodenFormatError):
        BrodenDataset(root, cache="off")
    with pytest.raises(BrodenFormatError):
        validate(root, decode=True)
    # explicitly allowed: the link is followed
    assert load_meta(root, allow_outside_links=True).num_images == 7
    assert validate(root, decode=True, allow_outside_links=True) == []
    ds = BrodenDataset(root, cache="off", allow_outside_links=True)
    np.testing.assert_array_equal(ds[3]["image"].permute(1, 2, 0).numpy(), tiny_broden_spec()[3]["image"])


def test_symlinked_png_out_of_the_root(root):
    out = _outside_copy(root, PART)
    link = root / "images" / PART
    link.unlink()
    link.symlink_to(out)
    _refused(root, 8, "'part'", repr(PART))
    assert load_meta(root, allow_outside_links=True).num_images == 7


def test_symlinked_directory_out_of_the_root(root):
    images = root / "images"
    elsewhere = root.parent.parent / "elsewhere"
    shutil.move(images / "synthetic", elsewhere)
    (images / "synthetic").symlink_to(elsewhere, target_is_directory=True)
    _refused(root, 2, "synthetic/img0", str(elsewhere.resolve()))
    assert BrodenDataset(root, cache="off", allow_outside_links=True)[0]["image"].shape == (3, 8, 8)


def test_links_that_stay_inside_are_accepted(root):
    images = root / "images"
    (images / "moved").mkdir()
    shutil.move(images / IMG3, images / "moved" / "img3.png")
    (images / IMG3).symlink_to(images / "moved" / "img3.png")
    # and a linked images/ directory itself (the dataset's own image store, wherever it lives)
    store = root.parent.parent / "store"
    shutil.move(images, store)
    (root / "images").symlink_to(store, target_is_directory=True)
    ds = BrodenDataset(root, cache="off")
    np.testing.assert_array_equal(ds[3]["image"].permute(1, 2, 0).numpy(), tiny_broden_spec()[3]["image"])


def test_paths_are_resolved_once_at_load_not_per_item(root, monkeypatch):
    calls = {"n": 0}
    real = os.path.realpath

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(format_mod.os.path, "realpath", counting)
    ds = BrodenDataset(root, cache="off")
    at_load = calls["n"]
    assert 0 < at_load <= 3  # images/ and its one subdirectory: per directory, not per file
    for i in range(len(ds)):
        ds[i]
    assert calls["n"] == at_load
