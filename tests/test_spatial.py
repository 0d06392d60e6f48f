"""dissect.spatial: connected components and spread of top-image masks, against hand counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from broden.errors import InputError
from skimage import measure

from dissect.spatial import (MaskPixels, MaskStats, layer_spatial_summary, mask_shape_stats, pixel_shape_stats,
                             top_image_masks, top_image_pixels)


def _masks(*grids: list[str]) -> torch.Tensor:
    """(1, k, H, W) bool masks from ASCII grids ('#' on)."""
    return torch.tensor([[[c == "#" for c in row] for row in g] for g in grids])[None]


def test_components_count_regions_and_respect_connectivity() -> None:
    two_blobs = ["##..", "##..", "...#", "...#"]
    diagonal = ["#...", ".#..", "..#.", "...#"]
    empty = ["....", "....", "....", "...."]
    eight = mask_shape_stats(_masks(two_blobs, diagonal, empty), connectivity=2)
    four = mask_shape_stats(_masks(two_blobs, diagonal, empty), connectivity=1)
    # blobs touching only diagonally: 2 blobs either way here; the diagonal line is 1 region or 4
    assert eight.components.tolist() == [[2, 1, 0]]
    assert four.components.tolist() == [[2, 4, 0]]
    assert eight.area.tolist() == [[6, 4, 0]]


def test_masks_stacked_for_one_label_call_never_join() -> None:
    # the bottom row of the first mask and the top row of the second are both on: still 1 + 1
    bottom = ["....", "....", "####"]
    top = ["####", "....", "...."]
    stats = mask_shape_stats(_masks(bottom, top), connectivity=2)
    assert stats.components.tolist() == [[1, 1]]


def test_spread_is_the_mean_distance_to_the_centroid_over_the_longer_side() -> None:
    square = ["....", ".##.", ".##.", "...."]  # centroid (1.5, 1.5); every pixel at sqrt(0.5)
    corners = ["#..#", "....", "....", "#..#"]  # centroid (1.5, 1.5); every pixel at sqrt(4.5)
    stats = mask_shape_stats(_masks(square, corners, ["....", "....", "....", "...."]))
    assert stats.spread[0, 0] == pytest.approx(math.sqrt(0.5) / 4)
    assert stats.spread[0, 1] == pytest.approx(math.sqrt(4.5) / 4)
    assert math.isnan(stats.spread[0, 2])  # an empty mask has no spread


def test_per_unit_means_skip_empty_masks_and_layer_summary_counts_units() -> None:
    stats = MaskStats(components=np.array([[2, 0, 4], [0, 0, 0]]),
                      spread=np.array([[0.1, np.nan, 0.3], [np.nan, np.nan, np.nan]]),
                      area=np.array([[5, 0, 7], [0, 0, 0]]))
    comp, spread = stats.per_unit()
    assert comp[0] == 3.0 and spread[0] == pytest.approx(0.2)
    assert math.isnan(comp[1]) and math.isnan(spread[1])
    summary = layer_spatial_summary(np.array([3.0, np.nan, 1.0]), np.array([0.2, np.nan, 0.4]),
                                    np.array([False, True, True]))
    assert summary["units"] == 2 and summary["components"] == 2.0 and summary["spread"] == pytest.approx(0.3)
    assert summary["detectors"] == {"units": 1, "components": 1.0, "spread": 0.4}


def test_top_image_masks_equal_the_dissection_masks() -> None:
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(5, 3, 7, 9, generator=gen)  # (U, k, h, w)
    thr = torch.randn(5, generator=gen) * 0.5 + 1.0
    got = top_image_masks(maps, thr, (14, 18))
    dense = F.interpolate(maps.float(), size=(14, 18), mode="bilinear", align_corners=False) > thr.view(5, 1, 1, 1)
    assert got.shape == (5, 3, 14, 18) and torch.equal(got, dense)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_pixel_lists_in_any_order_give_each_masks_own_counts(connectivity) -> None:
    # sparse masks with runs of empty rows (collapsed in the one-call stack), regions touching
    # the first and last rows, and empty masks; oracle: one scikit-image call per mask
    gen = np.random.default_rng(4)
    u, k, hh, ww = 3, 4, 17, 11
    masks = gen.random((u, k, hh, ww)) < 0.12
    masks[:, :, 5:9] = False  # a run of empty rows inside every mask
    masks[0, 1] = False
    masks[1, 2, 0, :] = masks[1, 2, -1, :] = True
    which, ys, xs = np.nonzero(masks.reshape(u * k, hh, ww))
    order = gen.permutation(which.size)
    px = MaskPixels.of(which[order], ys[order], xs[order], (u, k, hh, ww))
    got = pixel_shape_stats(px, connectivity)
    dense = mask_shape_stats(torch.from_numpy(masks), connectivity)
    for name in ("components", "area"):
        np.testing.assert_array_equal(getattr(got, name), getattr(dense, name))
    np.testing.assert_array_equal(got.spread, dense.spread)  # bit for bit: pixels re-sorted first
    for a in range(u):
        for j in range(k):
            m = masks[a, j]
            assert got.components[a, j] == measure.label(m, connectivity=connectivity).max()
            if m.any():
                y, x = np.nonzero(m)
                assert got.spread[a, j] == pytest.approx(np.hypot(y - y.mean(), x - x.mean()).mean() / hh)


def test_top_image_pixels_are_the_top_image_masks() -> None:
    gen = torch.Generator().manual_seed(5)
    maps = torch.randn(4, 3, 6, 7, generator=gen)
    thr = torch.randn(4, generator=gen) * 0.5 + 0.8
    px = top_image_pixels(maps, thr, (13, 15))
    which, ys, xs = np.nonzero(top_image_masks(maps, thr, (13, 15)).reshape(12, 13, 15).numpy())
    assert px.shape == (4, 3, 13, 15) and which.size > 0
    for got, want in ((px.which, which), (px.ys, ys), (px.xs, xs)):
        np.testing.assert_array_equal(got, want)


def test_bad_connectivity_is_refused() -> None:
    with pytest.raises(InputError, match="connectivity"):
        mask_shape_stats(_masks(["#"]), connectivity=3)
