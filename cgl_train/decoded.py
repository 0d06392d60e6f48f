"""ImageFolder images decoded once into memory, when they fit a budget: training then never waits on decoding.

`DecodedImages.load(path)` returns what torchvision's default loader returns
(`Image.open(path).convert("RGB")`), from one uint8 buffer filled by worker
threads (broden.loader), so the random crops and flips applied after it, seeded
per sample (cgl_train.engine.SeededSamples), see the very same pixels and give
the same tensors. Sets that do not fit stay on disk and are decoded item by item
(by the DataLoader's worker processes).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from broden._progress import progress
from broden.errors import InputError
from broden.loader import Prefetcher, available_cores

__all__ = ["DecodedImages", "decoded_sizes"]

log = logging.getLogger(__name__)


def _rgb(path: str) -> Image.Image:
    """torchvision.datasets.folder.pil_loader: the reference these pixels must equal."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def _header_bytes(path: str) -> int:
    with Image.open(path) as img:  # reads the header only
        w, h = img.size
    return 3 * w * h


def decoded_sizes(paths: Sequence[str], budget: int, threads: int | None = None) -> list[int] | None:
    """RGB bytes of each of `paths` decoded, from their headers; None as soon as the running sum passes `budget`.

    Stopping early keeps the check cheap on sets far too big (ImageNet): a few
    thousand headers, not a million.
    """
    threads = threads or available_cores()
    sizes: list[int] = []
    total = 0
    with Prefetcher(_header_bytes, paths, threads=threads, depth=8 * threads) as headers:
        for n in headers:
            total += n
            if total > budget:
                return None
            sizes.append(n)
    return sizes


class DecodedImages:
    """The RGB pixels of `paths` (of `sizes` bytes each, from decoded_sizes), decoded once by `threads`
    threads straight into one uint8 buffer."""

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], threads: int | None = None,
                 show_progress: bool = True):
        self.paths = [str(p) for p in paths]
        self.index = {p: i for i, p in enumerate(self.paths)}
        self.offsets = np.zeros(len(self.paths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(sizes, dtype=np.int64), out=self.offsets[1:])
        # one buffer, not a million small arrays: forked DataLoader workers share its pages untouched
        self.buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        self.shapes: list[tuple[int, ...]] = [()] * len(self.paths)
        threads = threads or available_cores()
        bar = progress(total=len(self.paths), desc="decoding images", unit="img",
                       **({} if show_progress else {"disable": True}))
        with Prefetcher(self._fill, range(len(self.paths)), threads=threads, depth=8 * threads) as done:
            for _ in done:
                bar.update(1)
        bar.close()

    def _fill(self, i: int) -> None:
        path = self.paths[i]
        try:
            arr = np.asarray(_rgb(path))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{path}: cannot decode image ({e})") from None
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if arr.size != hi - lo:  # the header lied (or the file changed since): refuse rather than misread
            raise InputError(f"{path}: decoded to {arr.shape}, not the {hi - lo} bytes its header announced")
        self.buffer[lo:hi] = arr.reshape(-1)
        self.shapes[i] = arr.shape

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self.buffer.nbytes)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: str | Path) -> Image.Image:
        """The image at `path` as torchvision's loader gives it (RGB), from memory; unknown paths from disk."""
        i = self.index.get(str(path))
        if i is None:
            return _rgb(str(path))
        return Image.fromarray(self.buffer[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i]))
