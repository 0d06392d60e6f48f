"""Training data: the paper's synthetic shapes set or an ImageFolder root.

Both yield (normalised float image (3, H, W), int label). Normalisation travels
in the checkpoint (`x = (img / 255 - mean) / std`):
- synthetic shapes: by default the training split's per-channel mean and std
  (`--synthetic-normalization train_stats`; 'half' is mean 0.5, std 0.5, which
  maps 0..255 to -1..1); no augmentation (the paper mentions none).
- a directory written by `dissect synth` (classes.csv + synthetic.json): the same set as
  `--data synthetic --synthetic-dir DIR`, its parameters read from synthetic.json
  (`resolve_data` records it so: data 'synthetic', synthetic_dir DIR).
- ImageFolder (ImageNet / Places365 layout: root/train/<class>/*, root/val/<class>/*):
  torchvision's ImageNet mean/std; train = RandomResizedCrop(input_size) +
  horizontal flip, val = Resize(input_size * 256 / 224) + CenterCrop(input_size).

A synthetic split is decoded once, in threads, into one uint8 tensor (N, 3, H, W)
(64 px: 12 KiB an image, 354 MiB for the default 28,800): items and whole batches
(`SyntheticShapes.batch`, what the training loop uses) are then an index and a
normalisation away, with no per-item PIL decode and no DataLoader.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from broden.errors import InputError
from cgl_train.config import TrainConfig
from dissect.models import NORMALIZATIONS

__all__ = ["SYNTHETIC_NORMALIZATION", "IMAGENET_NORMALIZATION", "DataBundle", "SyntheticShapes", "channel_statistics",
           "synthetic_cache_dir", "prepare_synthetic", "build_datasets", "normalize_uint8", "decode_images",
           "resolve_data", "is_synthetic_set", "DATA_LAYOUTS"]

log = logging.getLogger(__name__)

SYNTHETIC_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
IMAGENET_NORMALIZATION = NORMALIZATIONS["imagenet"]  # one definition, the one dissections apply
DEFAULT_IMAGEFOLDER_SIZE = 224


@dataclass
class DataBundle:
    """Train/val datasets and what a checkpoint must record about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    normalization: dict[str, list[float]]
    input_size: int
    info: dict[str, Any] = field(default_factory=dict)  # kind, root, sizes: recorded in the log


def channel_statistics(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and (population) std of uint8 images (N, 3, H, W) on the 0..1 scale.

    The shapes are pure colours on a white background, so about 96 % of pixels are white: centring
    and scaling by the training split's own statistics gives the first layer zero-mean inputs, which
    the tiny CNN needs to leave its initial plateau within a few epochs (measured: 5 epochs to 100 %
    validation where mean 0.5 / std 0.5 needed twice as many or stalled).
    """
    x = images.to(torch.float64).div_(255.0)  # (N, 3, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def normalize_uint8(img: torch.Tensor, normalization: dict[str, list[float]]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 `(img / 255 - mean) / std`.

    Elementwise, so normalising a batch gives bit for bit the stacked normalised items.
    """
    mean = torch.tensor(normalization["mean"], dtype=torch.float32, device=img.device).view(3, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32, device=img.device).view(3, 1, 1)
    return (img.float() / 255.0 - mean) / std


def _decode_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))  # (H, W, 3) uint8, writable (torch.from_numpy warns otherwise)


def decode_images(paths: list[Path], threads: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) of same-size RGB images, decoded in a thread pool (PIL releases the GIL).

    An image of another size than the first is an InputError naming it.
    """
    if not paths:
        raise InputError("decode_images: no images")
    workers = threads or min(8, os.cpu_count() or 1)
    first = _decode_rgb(paths[0])
    out = torch.empty((len(paths), 3, first.shape[0], first.shape[1]), dtype=torch.uint8)

    def fill(i: int) -> None:
        arr = first if i == 0 else _decode_rgb(paths[i])
        if arr.shape != first.shape:
            raise InputError(f"{paths[i]}: {arr.shape[1]}x{arr.shape[0]} px, expected "
                             f"{first.shape[1]}x{first.shape[0]} like {paths[0].name}")
        out[i].copy_(torch.from_numpy(arr).permute(2, 0, 1))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(len(paths))))  # list(): re-raise the first error here
    return out


class SyntheticShapes(Dataset):
    """One split of a generated shapes dir (classes.csv), labelled 'binary' or 'classes45'.

    The split's images are decoded once at construction into `images`, uint8 (N, 3, H, W);
    `labels` is int64 (N,). `dataset[i]` and `dataset.batch(indices)` normalise on the fly.
    """

    def __init__(self, root: str | Path, split: str, labeling: str = "binary",
                 normalization: dict[str, list[float]] | None = None) -> None:
        from broden.synthetic import load_classes  # late: only synthetic runs need the generator

        self.root = Path(root)
        self.normalization = normalization or SYNTHETIC_NORMALIZATION
        column = {"binary": "binary", "classes45": "class45"}.get(labeling)
        if column is None:
            raise InputError(f"labeling {labeling!r}: expected 'binary' or 'classes45'")
        table = load_classes(self.root)
        rows = table[table["split"] == split]
        if len(rows) == 0:
            raise InputError(f"{self.root / 'classes.csv'}: no rows with split {split!r}")
        self.paths = [self.root / "images" / str(p) for p in rows["image"]]
        self.labels = torch.tensor([int(v) for v in rows[column]], dtype=torch.int64)  # (N,)
        self.images = decode_images(self.paths)  # (N, 3, H, W) uint8
        self.labeling = labeling
        if labeling == "binary":
            self.class_names = ["no_square", "square"]
        else:
            names = table.drop_duplicates("class45").sort_values("class45")
            self.class_names = [str(n) for n in names["class45_name"]]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return normalize_uint8(self.images[i], self.normalization), int(self.labels[i])

    def batch(self, indices: torch.Tensor, device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W) and labels (B,) of int64 `indices` (B,), on `device`.

        The uint8 images travel to the device before normalising (a quarter of the bytes);
        the values equal the stacked `self[i]` bit for bit.
        """
        images = self.images.index_select(0, indices)  # (B, 3, H, W) uint8
        labels = self.labels.index_select(0, indices)  # (B,)
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return normalize_uint8(images, self.normalization), labels


def synthetic_cache_dir(config: TrainConfig) -> Path:
    """Where `--data synthetic` generates its set: --synthetic-dir, else broden.synthetic.synthetic_dir().

    The default lives under $DISSECT_CACHE_DIR (or ~/.cache/concept-dissect), the same place
    `dissect run --dataset synthetic` looks, so both CLIs share one generation.
    """
    from broden.synthetic import synthetic_dir  # late: only synthetic runs need the generator

    if config.synthetic_dir:
        return Path(config.synthetic_dir)
    return synthetic_dir(None, per_class=config.synthetic_per_class, size=config.synthetic_size,
                         seed=config.synthetic_seed, val_fraction=config.synthetic_val_fraction)


def prepare_synthetic(config: TrainConfig, progress: bool = True) -> Path:
    """Generate the synthetic set once (an identical earlier generation is reused)."""
    from broden.synthetic import generate_shapes_dataset

    out = synthetic_cache_dir(config)
    log.info("synthetic shapes set at %s", out)
    # a clash is reported against the flag the user can change: their --synthetic-dir, else the
    # cache location (DISSECT_CACHE_DIR)
    option = "--synthetic-dir" if config.synthetic_dir else "synthetic cache dir ($DISSECT_CACHE_DIR)"
    return Path(generate_shapes_dataset(out, per_class=config.synthetic_per_class,
                                        size=config.synthetic_size, seed=config.synthetic_seed,
                                        val_fraction=config.synthetic_val_fraction,
                                        progress=progress, option=option))


def _synthetic(config: TrainConfig, root: Path) -> DataBundle:
    if config.input_size is not None and config.input_size != config.synthetic_size:
        raise InputError(f"option input_size = {config.input_size}: synthetic images are "
                         f"{config.synthetic_size} px (set --synthetic-size instead)")
    train = SyntheticShapes(root, "train", config.labeling)
    norm = (channel_statistics(train.images) if config.synthetic_normalization == "train_stats"
            else {k: list(v) for k, v in SYNTHETIC_NORMALIZATION.items()})
    train.normalization = norm
    val = SyntheticShapes(root, "val", config.labeling, normalization=norm)
    return DataBundle(train, val, len(train.class_names), train.class_names, norm, config.synthetic_size,
                      {"kind": "synthetic", "root": str(root), "labeling": config.labeling,
                       "train_images": len(train), "val_images": len(val)})


def _image_folder(config: TrainConfig, root: Path) -> DataBundle:
    from torchvision import datasets, transforms

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise InputError(f"--data {root}: has no {split}/ folder; accepted: {DATA_LAYOUTS}")
    size = config.input_size or DEFAULT_IMAGEFOLDER_SIZE
    norm = {k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}  # a copy: the bundle may be edited
    normalize = transforms.Normalize(norm["mean"], norm["std"])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:  # torchvision's "found no valid file" errors
        raise InputError(f"--data {root}: {e}") from e
    if train.classes != val.classes:
        raise InputError(f"--data {root}: train/ and val/ have different class folders "
                         f"({len(train.classes)} vs {len(val.classes)})")
    _decode_once(config, train, val)
    return DataBundle(train, val, len(train.classes), list(train.classes), norm, size,
                      {"kind": "imagefolder", "root": str(root),
                       "train_images": len(train), "val_images": len(val)})


def _decode_once(config: TrainConfig, *folders: Any) -> None:
    """Decode every image of the ImageFolders once into memory when they fit --image-memory-mb.

    The folders' loader then hands out the held pixels (the same RGB image as
    torchvision's loader), and the transforms, random ones included, still run
    per item. Sets that do not fit keep decoding per item (in --workers processes).
    """
    from cgl_train.decoded import DecodedImages, decoded_sizes

    budget = config.image_memory_mb * 2 ** 20
    paths = [p for f in folders for p, _ in f.samples]
    sizes = decoded_sizes(paths, budget) if budget else None
    if sizes is None:
        log.info("ImageFolder images exceed --image-memory-mb %d decoded: decoding each item as it loads "
                 "(%d worker processes)", config.image_memory_mb, config.workers)
        return
    store = DecodedImages(paths, sizes, show_progress=not config.quiet)
    log.info("holding %d decoded ImageFolder images in memory (%.1f MiB)", len(store), store.nbytes / 2 ** 20)
    for f in folders:
        f.loader = store.load


DATA_LAYOUTS = ("an ImageFolder root (train/<class>/* and val/<class>/*, the ImageNet/Places365 layout), "
                "a synthetic set written by `dissect synth --out DIR` (classes.csv, synthetic.json), or the "
                "word 'synthetic' (the paper's shapes, generated once)")
# TrainConfig's fields for synthetic.json's "parameters" keys
_SYNTHETIC_FIELDS = {"per_class": "synthetic_per_class", "size": "synthetic_size", "seed": "synthetic_seed",
                     "val_fraction": "synthetic_val_fraction"}


def is_synthetic_set(root: Path) -> bool:
    """Whether `root` holds a set written by broden.synthetic (`dissect synth`): synthetic.json and classes.csv."""
    return (root / "synthetic.json").is_file() and (root / "classes.csv").is_file()


def _synthetic_parameters(root: Path) -> dict[str, Any]:
    import json

    path = root / "synthetic.json"
    try:
        params = json.loads(path.read_text())["parameters"]
        values = {key: params[key] for key in (*_SYNTHETIC_FIELDS, "shape_size")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--data {root}: {path} is unreadable or has no 'parameters' with "
                         f"{', '.join((*_SYNTHETIC_FIELDS, 'shape_size'))} ({e}); regenerate it with "
                         f"`dissect synth --out {root}`") from None
    return values


def resolve_data(config: TrainConfig) -> TrainConfig:
    """`config` with --data DIR of a `dissect synth` set written as its equivalent, in place (and returned).

    data becomes 'synthetic', synthetic_dir DIR, and the synthetic_* options the set's own
    parameters (synthetic.json), so config.json and checkpoints record the set as
    `--data synthetic --synthetic-dir DIR` would, and `dissect run --dataset synthetic` finds it.
    A synthetic_* option set to another value than the set's is an InputError, as is a
    --data that is neither of DATA_LAYOUTS.
    """
    from broden.synthetic import default_shape_size

    if config.data == "synthetic":
        return config
    root = Path(config.data).expanduser()
    if not root.is_dir():
        raise InputError(f"--data {config.data!r}: not a directory; accepted: {DATA_LAYOUTS}")
    if not is_synthetic_set(root):
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise InputError(f"--data {root}: neither an ImageFolder root (no train/ and val/ folders) nor a "
                             f"synthetic set (no classes.csv and synthetic.json); accepted: {DATA_LAYOUTS}")
        return config
    params = _synthetic_parameters(root)
    defaults = TrainConfig()
    for key, name in _SYNTHETIC_FIELDS.items():
        value = getattr(config, name)
        if value != getattr(defaults, name) and value != params[key]:
            raise InputError(f"--{name.replace('_', '-')} {value}: --data {root} is a synthetic set generated "
                             f"with {key} {params[key]} (its synthetic.json); leave the option out")
        setattr(config, name, params[key])
    if params["shape_size"] != default_shape_size(params["size"]):
        raise InputError(f"--data {root}: generated with --shape-size {params['shape_size']}, and cgl-train's "
                         f"synthetic options have no shape size (theirs: {default_shape_size(params['size'])} "
                         f"at {params['size']} px); regenerate with the default shape size")
    if config.synthetic_dir and Path(config.synthetic_dir).expanduser().resolve() != root.resolve():
        raise InputError(f"--synthetic-dir {config.synthetic_dir}: --data {root} is itself a synthetic set; "
                         f"give one of them")
    log.info("--data %s: a synthetic set (synthetic.json), trained on as --data synthetic --synthetic-dir %s",
             root, root)
    config.data, config.synthetic_dir = "synthetic", str(root.resolve())
    return config


def build_datasets(config: TrainConfig, progress: bool = True) -> DataBundle:
    """Datasets for `config.data`: 'synthetic' (generated on first use), a `dissect synth` directory
    (`resolve_data` rewrites `config` in place to its --data synthetic equivalent) or an ImageFolder root."""
    resolve_data(config)
    if config.data == "synthetic":
        return _synthetic(config, prepare_synthetic(config, progress))
    return _image_folder(config, Path(config.data))
