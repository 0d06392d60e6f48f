"""The benchmark scripts' own data: a pooled dataset must read like one made row by row."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from broden.dataset import BrodenDataset

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pooled_dataset_repeats_the_encoded_rows_under_their_own_names(tmp_path):
    speed = _script("dissect_speed")
    full = BrodenDataset(speed.make_dataset(tmp_path / "full", 3))
    pooled = BrodenDataset(speed.make_dataset(tmp_path / "pooled", 7, pool=3))
    assert len(full) == 3 and len(pooled) == 7
    names = [r.image for r in pooled.meta.records]
    assert len(set(names)) == 7  # every row its own files
    whole, first = pooled.get_batch(list(range(7))), full.get_batch([0, 1, 2])
    for k in (0, 1, 2, 3, 4, 5, 6):  # row k holds the content of row k % 3, as encoded without a pool
        for field in ("image", "labels", "image_labels"):
            assert torch.equal(whole[field][k], first[field][k % 3]), (k, field)
    files = pooled.root / "images" / names[4]
    assert files.stat().st_ino == (pooled.root / "images" / names[1]).stat().st_ino  # linked, not re-encoded


def test_phases_are_checked_before_any_work(tmp_path, capsys):
    speed = _script("dissect_speed")
    for bad, why in (("warm,bare", "warm needs cold"), ("cold,hot", "subset of cold,warm,bare")):
        with pytest.raises(SystemExit):
            speed.main(["--n", "2", "--dir", str(tmp_path), "--phases", bad])
        assert why in capsys.readouterr().err
    assert not (tmp_path / "broden").exists()
