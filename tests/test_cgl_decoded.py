"""cgl-train on ImageFolder data: images decoded once into memory give the very same batches and training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgl_train.config import TrainConfig
from cgl_train.data import build_datasets
from cgl_train.decoded import DecodedImages, decoded_sizes
from cgl_train.engine import build_loaders, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/ of 2 classes, mixing the file kinds torchvision's loader converts: RGB PNG, JPEG,
    grayscale, RGBA and palette images, of different sizes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(4):
                h, w = 30 + 4 * i, 44 - 2 * i
                rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                kind = (i + c) % 5
                if kind == 0:
                    Image.fromarray(rgb).save(d / f"{i}.png")
                elif kind == 1:
                    Image.fromarray(rgb).save(d / f"{i}.jpg", quality=90)
                elif kind == 2:
                    Image.fromarray(rgb[..., 0]).save(d / f"{i}.png")
                elif kind == 3:
                    rgba = np.dstack([rgb, rng.integers(0, 256, size=(h, w), dtype=np.uint8)])
                    Image.fromarray(rgba).save(d / f"{i}.png")
                else:
                    Image.fromarray(rgb).quantize(16).save(d / f"{i}.png")
    return root


def cfg(folder: Path, **kw) -> TrainConfig:
    base = dict(data=str(folder), input_size=16, batch_size=3, workers=0, seed=5, quiet=True,
                arch_kwargs={"width1": 8, "width2": 16}, groups=4, epochs=1)
    base.update(kw)
    return TrainConfig(**base)


def test_held_images_equal_torchvision_loading(folder):
    from torchvision.datasets.folder import default_loader, pil_loader

    on_disk = build_datasets(cfg(folder, image_memory_mb=0), progress=False)
    held = build_datasets(cfg(folder), progress=False)
    assert on_disk.train.loader is default_loader  # 0: torchvision's own per-item decoding
    store = held.train.loader.__self__
    assert isinstance(store, DecodedImages) and held.val.loader.__self__ is store
    files = [p for p, _ in held.train.samples + held.val.samples]
    assert len(store) == 16 and store.nbytes == sum(3 * w * h for w, h in (Image.open(p).size for p in files))
    for path in files:
        a, b = pil_loader(path), store.load(path)
        assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)), path


@pytest.mark.parametrize("epoch", [0, 1])
def test_batches_and_random_crops_are_the_same_from_memory(folder, epoch):
    def batches(**kw) -> list:
        c = cfg(folder, **kw)
        loaders = build_loaders(c, build_datasets(c, progress=False))
        loaders.set_epoch(epoch)
        return list(loaders.train) + list(loaders.val)

    disk, memory = batches(image_memory_mb=0), batches()
    assert len(disk) == len(memory) == 6
    for (xa, ya), (xb, yb) in zip(disk, memory):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = batches(seed=6)  # the crops are random per (seed, epoch, index): another seed, other pixels
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(memory, other))


def test_a_training_run_is_identical_with_images_in_memory(folder, tmp_path):
    runs = {}
    for name, mb in (("disk", 0), ("memory", 64)):
        result = train(cfg(folder, image_memory_mb=mb, out=str(tmp_path / name), lambda_g=1e-2, lambda_s=1e-2))
        runs[name] = (result, torch.load(result.latest, weights_only=False)["state_dict"])
    (ra, sa), (rb, sb) = runs["disk"], runs["memory"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    strip = [{k: v for k, v in h.items() if "time" not in k} for h in (ra.metrics, rb.metrics)]
    assert strip[0] == strip[1] and len(strip[0]) > 5  # losses, accuracies: all but the clock


def test_sets_over_the_budget_are_not_held(folder):
    paths = [str(p) for p in sorted(folder.rglob("*.*"))]
    sizes = decoded_sizes(paths, budget=10 ** 9, threads=2)
    assert sizes is not None and len(sizes) == 16 and sum(sizes) == sum(3 * w * h for w, h in
                                                                          (Image.open(p).size for p in paths))
    assert decoded_sizes(paths, budget=sum(sizes) - 1) is None
    tight = build_datasets(cfg(folder, image_memory_mb=0), progress=False)
    assert not isinstance(getattr(tight.train.loader, "__self__", None), DecodedImages)
