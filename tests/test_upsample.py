"""dissect.upsample against PIL's bilinear resize and against the dense mask expression."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from broden.errors import InputError
from dissect import upsample as upsample_mod
from dissect.upsample import mask_pixels, threshold_masks, upsample


def _pil_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(x.astype(np.float32))  # mode 'F'
    assert img.mode == "F"
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


@pytest.mark.parametrize("src,dst", [((6, 7), (12, 14)),      # 2x
                                     ((13, 13), (112, 112)),  # AlexNet conv5 -> Broden 224 labels
                                     ((5, 9), (23, 40)),      # odd, non-square factors
                                     ((1, 4), (3, 11))])      # a single row
def test_upsample_matches_pil_bilinear_when_upscaling(src, dst):
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(2, 3, *src, generator=gen) * 5
    ours = upsample(acts, dst)
    assert ours.shape == (2, 3, *dst) and ours.dtype == torch.float32
    # float32 rounding (torch) vs double accumulation (PIL): within 2e-6 of the maps' scale
    atol = 2e-6 * float(acts.abs().max())
    for b in range(2):
        for u in range(3):
            ref = _pil_bilinear(acts[b, u].numpy(), dst)
            np.testing.assert_allclose(ours[b, u].numpy(), ref, rtol=0, atol=atol)


def test_upsample_differs_from_pil_when_downscaling():
    # PIL widens its filter on downscale (antialiasing); F.interpolate does not. Documented, not hidden.
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(1, 1, 16, 16, generator=gen)
    ours = upsample(acts, (5, 5))[0, 0].numpy()
    ref = _pil_bilinear(acts[0, 0].numpy(), (5, 5))
    assert np.abs(ours - ref).max() > 1e-2


def test_upsample_converts_half_precision_to_float32():
    acts = torch.arange(12, dtype=torch.float16).view(1, 1, 3, 4)
    out = upsample(acts, (6, 8))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), upsample(acts.float(), (6, 8)).numpy())


def test_upsample_rejects_bad_input():
    with pytest.raises(InputError, match="B, U, h, w"):
        upsample(torch.zeros(3, 4, 5), (8, 8))
    with pytest.raises(InputError, match="size"):
        upsample(torch.zeros(1, 1, 4, 5), (0, 8))


def test_threshold_masks_equals_dense_expression():
    gen = torch.Generator().manual_seed(2)
    b, u, h, w, size = 5, 6, 7, 7, (20, 23)
    acts = torch.randn(b, u, h, w, generator=gen)
    thresholds = torch.quantile(acts.transpose(0, 1).reshape(u, -1), 0.9, dim=1)
    # adversarial maps: constant exactly at the threshold, and just above it
    acts[0, 0] = thresholds[0]
    acts[1, 1] = torch.nextafter(thresholds[1], torch.tensor(np.inf))
    acts[2, 2] = -1e30  # far below: pruned
    dense = upsample(acts, size) > thresholds.view(1, u, 1, 1)
    for max_elements in (1 << 24, 500):  # one chunk, and many
        got = threshold_masks(acts, thresholds, size, max_elements=max_elements)
        assert got.dtype == torch.bool and got.shape == (b, u, *size)
        assert torch.equal(got, dense)
    assert not dense[2, 2].any() and dense.any()


def test_threshold_masks_rejects_wrong_threshold_shape():
    with pytest.raises(InputError, match="thresholds"):
        threshold_masks(torch.zeros(1, 3, 4, 4), torch.zeros(2), (8, 8))


# ---------------------------------------------------------------- sparse masks (mask_pixels)

def _dense_keys(acts, thresholds, size):
    # (b*U + u) * sh*sw + y*sw + x of every pixel of the dense expression, sorted
    b, u = acts.shape[:2]
    on = upsample(acts, size) > thresholds.view(1, u, 1, 1)
    return torch.nonzero(on.reshape(-1)).squeeze(1)


def _sparse_keys(acts, thresholds, size, max_elements=1 << 23):
    keys = [rows * (size[0] * size[1]) + pix for rows, pix in
            mask_pixels(acts, thresholds, size, max_elements)]
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
    assert keys.dtype == torch.int64
    assert keys.unique().numel() == keys.numel()  # every pixel once
    return keys.sort().values


def _adversarial_maps(src, seed):
    gen = torch.Generator().manual_seed(seed)
    b, u = 3, 6
    acts = torch.randn(b, u, *src, generator=gen)
    acts[:, 1] = torch.relu(acts[:, 1])  # ReLU maps: many exact zeros
    acts[:, 2] = (acts[:, 2] * 4).round() / 4  # heavy ties
    acts[:, 4] = acts[:, 4] * 1e6
    flat = acts.transpose(0, 1).reshape(u, -1)
    thresholds = torch.quantile(flat, 0.9, dim=1)
    thresholds[1] = 0.0  # strict: zeros must stay off
    thresholds[2] = 0.5  # equal to many source values
    thresholds[3] = flat[3].max()  # equal to the largest source
    thresholds[5] = -0.3  # negative: whole regions fire
    acts[0, 0] = thresholds[0]  # constant exactly at T
    acts[1, 0] = torch.nextafter(thresholds[0], torch.tensor(np.inf))  # one ulp above
    return acts, thresholds


@pytest.mark.parametrize("src,dst", [((13, 13), (112, 112)), ((27, 27), (56, 56)), ((55, 55), (112, 112)),
                                     ((5, 9), (23, 40)), ((7, 7), (7, 7)), ((1, 4), (3, 11)),
                                     ((20, 20), (10, 13))])
def test_mask_pixels_equals_dense_expression_bit_for_bit(src, dst):
    for seed in range(2):
        acts, thresholds = _adversarial_maps(src, seed)
        want = _dense_keys(acts, thresholds, dst)
        assert want.numel() > 0
        assert torch.equal(_sparse_keys(acts, thresholds, dst), want)
        assert torch.equal(_sparse_keys(acts, thresholds, dst, max_elements=40_000), want)  # several chunks


def test_mask_pixels_ambiguous_pixels_are_decided_by_interpolate(monkeypatch):
    # a huge ambiguity band sends most candidate pixels to F.interpolate: same pixels
    acts, thresholds = _adversarial_maps((13, 13), 7)
    want = _dense_keys(acts, thresholds, (112, 112))
    calls = []
    original = upsample_mod._decide_densely

    def spy(*args):
        calls.append(args[3].numel())
        return original(*args)

    monkeypatch.setattr(upsample_mod, "_decide_densely", spy)
    monkeypatch.setattr(upsample_mod, "_AMBIGUOUS", 0.3)
    assert torch.equal(_sparse_keys(acts, thresholds, (112, 112)), want)
    assert calls and sum(calls) > 1000


def test_mask_pixels_with_infinite_values_and_empty_masks():
    gen = torch.Generator().manual_seed(5)
    acts = torch.randn(2, 3, 6, 6, generator=gen)
    acts[0, 1, 2, 3] = float("inf")
    acts[1, 2, 0, 0] = -float("inf")
    thresholds = torch.tensor([0.5, 1.0, 0.0])
    assert torch.equal(_sparse_keys(acts, thresholds, (20, 17)), _dense_keys(acts, thresholds, (20, 17)))
    far = torch.full((3,), 100.0)
    assert _sparse_keys(acts.clamp(max=1), far, (20, 17)).numel() == 0


def test_mask_pixels_rejects_bad_input():
    with pytest.raises(InputError, match="thresholds"):
        list(mask_pixels(torch.zeros(1, 3, 4, 4), torch.zeros(2), (8, 8)))
    with pytest.raises(InputError, match="size"):
        list(mask_pixels(torch.zeros(1, 3, 4, 4), torch.zeros(3), (8, 0)))


# ---------------------------------------------------------------- mode="pil"

def _pil_dense_keys(acts, thresholds, size):
    from dissect.pil_resample import pil_bilinear
    u = acts.shape[1]
    on = pil_bilinear(acts, size).double() > thresholds.double().view(1, u, 1, 1)
    return torch.nonzero(on.reshape(-1)).squeeze(1)


def _keys(acts, thresholds, size, **kw):
    keys = [rows * (size[0] * size[1]) + pix for rows, pix in mask_pixels(acts, thresholds, size, **kw)]
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
    assert keys.unique().numel() == keys.numel()
    return keys.sort().values


@pytest.mark.parametrize("src,dst", [((13, 13), (112, 112)), ((5, 9), (23, 40)), ((7, 7), (7, 7)),
                                     ((20, 20), (10, 13))])
def test_mask_pixels_pil_mode_equals_dense_pil_expression(src, dst):
    acts, thresholds = _adversarial_maps(src, 3)
    thr64 = thresholds.double()
    # unit 4: a float64 threshold between two float32 values
    thr64[4] = (thresholds[4].double() + torch.nextafter(thresholds[4], torch.tensor(np.inf)).double()) / 2
    want = _pil_dense_keys(acts, thr64, dst)
    assert want.numel() > 0
    assert torch.equal(_keys(acts, thr64, dst, mode="pil"), want)
    assert torch.equal(_keys(acts, thr64, dst, max_elements=3000, mode="pil"), want)


def test_mask_pixels_torch_mode_still_compares_in_float32():
    acts, thresholds = _adversarial_maps((13, 13), 4)
    below = torch.nextafter(thresholds, torch.tensor(-np.inf))
    thr64 = thresholds.double() - (thresholds.double() - below.double()) / 4  # rounds back to thresholds
    assert torch.equal(thr64.float(), thresholds) and not torch.equal(thr64, thresholds.double())
    assert torch.equal(_keys(acts, thr64, (112, 112)), _dense_keys(acts, thresholds, (112, 112)))
    assert not torch.equal(_pil_dense_keys(acts, thr64, (112, 112)), _pil_dense_keys(acts, thresholds, (112, 112)))


def test_mask_pixels_rejects_unknown_mode():
    with pytest.raises(InputError, match="mode must be one of torch, pil, got 'PIL'"):
        list(mask_pixels(torch.zeros(1, 3, 4, 4), torch.zeros(3), (8, 8), mode="PIL"))
