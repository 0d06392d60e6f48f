"""dissect.mask_store: stage 2's mask pixels, read back by the label stage and the label strips."""
from __future__ import annotations

import numpy as np
import torch

from dissect.label_images import LabelStripBatch, label_intersections, label_intersections_from_pixels
from dissect.mask_store import MaskPixelStore
from dissect.spatial import MaskPixels, top_image_pixels
from dissect.upsample import mask_pixels

SIZE = (9, 11)  # label size: 2x-ish upsampling of (4, 5) maps, non-square


def _acts(seed: int, b: int = 6, u: int = 5) -> torch.Tensor:
    return torch.randn(b, u, 4, 5, generator=torch.Generator().manual_seed(seed))


def _thresholds(u: int = 5) -> torch.Tensor:
    return torch.linspace(0.2, 1.4, u)


def _index(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Dataset indices of the batches' images: index.csv rows of a filtered set (not positions)."""
    n = np.cumsum([0] + [len(b) for b in batches])
    return [torch.arange(n[i], n[i + 1]) * 3 + 100 for i in range(len(batches))]


def _fill(store: MaskPixelStore, layer: str, batches: list[torch.Tensor], thr: torch.Tensor) -> None:
    for i, (acts, index) in enumerate(zip(batches, _index(batches))):
        store.begin_batch(i, index, SIZE)
        for rows, pix in mask_pixels(acts, thr, SIZE, max_elements=40):  # many small chunks
            store.add(layer, i, rows, pix)


def test_label_intersections_from_stored_pixels_equal_finding_them_again():
    gen = torch.Generator().manual_seed(1)
    acts, thr = _acts(2), _thresholds()
    ids = torch.tensor([0, 0, 3, 7, 9])
    labels = ids[torch.randint(0, 5, (6, 2, *SIZE), generator=gen)].int()  # (B, K, sh, sw)
    image_labels = torch.tensor([[4], [0], [4], [8], [0], [8]])
    batch = LabelStripBatch(labels, image_labels, num_labels=10)
    unit_labels = torch.tensor([3, 4, 0, 9, 8])  # pixel labels, image-level labels and none
    store = MaskPixelStore(1 << 20, batch_size=6, max_units=5)
    _fill(store, "l", [acts], thr)
    rows, pix = store.pixels("l", 0)
    order = torch.randperm(rows.numel(), generator=gen)  # the order of the pixels does not matter
    got = label_intersections_from_pixels(rows[order], pix[order], batch, 5, unit_labels)
    want = label_intersections(acts, thr, labels, image_labels, unit_labels)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert int(want[:, [0, 1, 3]].count_nonzero()) > 5 and not want[:, 2].any()


def test_top_pixels_from_the_store_equal_the_top_maps_pixels():
    batches = [_acts(3), _acts(4), _acts(5)[:4]]  # batch size 6, the last one short
    thr = _thresholds()
    store = MaskPixelStore(1 << 20, batch_size=6, max_units=5)
    _fill(store, "l", batches, thr)
    everything = torch.cat(batches)  # (16, U, h, w)
    position = np.array([[15, 0, 7], [1, 13, 6], [0, 1, 2], [10, 3, 12], [14, 8, 5]])  # (U, k), all 3 batches
    u, k = position.shape
    indices = torch.cat(_index(batches)).numpy()[position]  # as TopImages keeps them: dataset indices
    maps = everything[torch.from_numpy(position), torch.arange(u)[:, None]]  # (U, k, h, w)
    want = top_image_pixels(maps, thr, SIZE)
    which, pix = store.top_pixels("l", indices, u)
    got = MaskPixels.of(which, pix // SIZE[1], pix % SIZE[1], (u, k, *SIZE))
    assert want.which.size > 50 and got.shape == want.shape
    for g, w in ((got.which, want.which), (got.ys, want.ys), (got.xs, want.xs)):
        np.testing.assert_array_equal(g, w)
    # an image the store never saw (between two of its images, or past the last): not all here
    assert store.top_pixels("l", np.where(position == 3, indices + 1, indices), u) is None
    assert store.top_pixels("l", np.where(position == 3, 10 ** 6, indices), u) is None


def test_a_store_over_its_limit_empties_itself():
    batches = [_acts(6), _acts(7)]
    thr = _thresholds()
    full = MaskPixelStore(1 << 20, batch_size=6, max_units=5)
    _fill(full, "l", batches, thr)
    assert full.usable and full.nbytes == 6 * sum(full.pixels("l", i)[0].numel() for i in range(2))
    small = MaskPixelStore(full.nbytes - 1, batch_size=6, max_units=5)  # one byte short
    _fill(small, "l", batches, thr)
    assert not small.usable and small.nbytes == 0 and small.pixels("l", 0)[0].numel() == 0
    assert small.top_pixels("l", np.array([[100]]), 5) is None
    # rows that would not fit int32, or no room at all: never used
    assert not MaskPixelStore(1 << 20, batch_size=2 ** 16, max_units=2 ** 15).usable
    assert not MaskPixelStore(0, batch_size=6, max_units=5).usable
