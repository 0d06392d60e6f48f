"""dissect.pil_resample against Pillow itself, and its exact sparse masks against the dense expression."""
from __future__ import annotations

import numpy as np
import PIL
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from broden.errors import InputError
from dissect.pil_resample import pil_bilinear, pil_mask_pixels
from dissect.stats import IoUTally

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _pillow(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32))
    assert img.mode == "F"
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _maps(src: tuple[int, int], seed: int) -> torch.Tensor:
    """(6, h, w) float32 maps: plain, negative-heavy, huge, tiny, constant, exact ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *src, generator=gen)
    x[0] *= 5
    x[1] = x[1] * 3 - 2  # mostly negative
    x[2] *= 1e30  # large magnitudes: products stay far from float64 overflow, as in Pillow
    x[3] *= 1e-30
    x[4] = 0.1  # constant, not representable: blends of it must round back the same way
    x[5] = (x[5] * 4).round() / 4  # many exactly equal neighbours
    return x


SIZES = [((13, 13), (112, 112)), ((14, 14), (112, 112)), ((27, 27), (113, 113)), ((56, 56), (112, 112)),
         ((7, 7), (112, 112)), ((112, 112), (112, 112)), ((5, 9), (23, 40)), ((16, 16), (7, 7)),
         ((12, 12), (24, 24)), ((5, 9), (5, 40)), ((9, 5), (40, 5)), ((1, 4), (3, 11)), ((55, 55), (113, 113)),
         ((20, 20), (10, 13)), ((3, 7), (1, 1))]


@pytest.mark.parametrize("src,dst", SIZES)
def test_pil_bilinear_equals_pillow_bit_for_bit(src, dst):
    for seed in range(2):
        x = _maps(src, seed)
        ours = pil_bilinear(x, dst)
        assert ours.dtype == torch.float32 and ours.shape == (6, *dst)
        for i in range(x.shape[0]):
            assert _same_bits(ours[i].numpy(), _pillow(x[i].numpy(), dst)), (src, dst, seed, i)


@pytest.mark.skipif(not PILLOW_13, reason="Pillow < 13 always resizes horizontally first")
@pytest.mark.parametrize("src,dst", [((40, 12), (9, 10)), ((7, 3), (1, 1)), ((50, 50), (10, 80))])
def test_pil_bilinear_follows_pillows_vertical_first_order(src, dst):
    x = _maps(src, 3)
    ours = pil_bilinear(x, dst)
    # the other order (width first, then height) rounds its temporary differently
    other = pil_bilinear(pil_bilinear(x, (src[0], dst[1])), dst)
    differs = 0
    for i in range(x.shape[0]):
        ref = _pillow(x[i].numpy(), dst)
        assert _same_bits(ours[i].numpy(), ref)
        differs += not _same_bits(other[i].numpy(), ref)
    assert differs > 0


def test_pil_bilinear_is_not_torch_interpolate():
    # the reason this module exists: F.interpolate rounds differently in the last bit
    x = _maps((13, 13), 4)[:2]
    ours = pil_bilinear(x, (112, 112))
    torch_up = F.interpolate(x[:, None], size=(112, 112), mode="bilinear", align_corners=False)[:, 0]
    assert not torch.equal(ours, torch_up)
    assert torch.allclose(ours, torch_up, rtol=0, atol=2e-6 * float(x.abs().max()))


def test_pil_bilinear_batched_equals_per_map():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 6, 9, generator=gen) * 7
    ours = pil_bilinear(x, (31, 50))
    assert ours.shape == (3, 4, 31, 50)
    for b in range(3):
        for u in range(4):
            single = pil_bilinear(x[b, u], (31, 50))
            assert torch.equal(ours[b, u], single)
            assert _same_bits(single.numpy(), _pillow(x[b, u].numpy(), (31, 50)))


@pytest.mark.parametrize("src,dst", [((13, 13), (112, 112)), ((12, 12), (24, 24)), ((16, 16), (7, 7))])
def test_pil_bilinear_infinities_and_nan_like_pillow(src, dst):
    # a zero-weight tap inside Pillow's range turns inf into NaN; one outside it must not
    x = _maps(src, 6)[0]
    x[2, 3], x[4, 1], x[0, 0], x[-1, -1] = float("inf"), -float("inf"), float("nan"), float("inf")
    ours = pil_bilinear(x, dst).numpy()
    ref = _pillow(x.numpy(), dst)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.array_equal(ours, ref, equal_nan=True)


def test_pil_bilinear_takes_other_dtypes_as_float32():
    x = torch.arange(30, dtype=torch.float64).view(5, 6) / 7
    assert torch.equal(pil_bilinear(x, (9, 4)), pil_bilinear(x.float(), (9, 4)))
    equal = pil_bilinear(x, (5, 6))
    assert equal.dtype == torch.float32 and torch.equal(equal, x.float())


def test_pil_bilinear_rejects_bad_input():
    with pytest.raises(InputError, match="size"):
        pil_bilinear(torch.zeros(4, 4), (0, 3))
    with pytest.raises(InputError, match="size"):
        pil_bilinear(torch.zeros(4, 4), (2.5, 3))
    with pytest.raises(InputError, match=r"\(\.\.\., h, w\)"):
        pil_bilinear(torch.zeros(4), (2, 3))


# ---------------------------------------------------------------- exact sparse masks

def _between_floats(t: torch.Tensor) -> torch.Tensor:
    """float64 values a quarter ulp below float32 t: rounding them to float32 gives t back."""
    below = torch.nextafter(t, torch.tensor(-np.inf))
    return t.double() - (t.double() - below.double()) / 4


def _adversarial(src, dst, seed):
    """(N, h, w) maps and float64 thresholds that sit on, next to, and between float32 output values."""
    x = torch.cat([_maps(src, seed), torch.relu(_maps(src, seed + 10))])  # (12, h, w), ReLU zeros too
    up = pil_bilinear(x, dst)
    flat = up.view(x.shape[0], -1)
    thr = torch.quantile(flat.double(), 0.9, dim=1)
    pick = flat.gather(1, flat.argmax(dim=1, keepdim=True) // 2)[:, 0]
    thr[0] = pick[0].double()  # equal to an output value: that pixel is off
    thr[1] = _between_floats(pick[1])  # just below it, between floats: that pixel is on
    thr[4] = float(x[4, 0, 0])  # the constant map, exactly at its value
    thr[6] = 0.0  # ReLU zeros stay off
    thr[7] = float(flat[7].max())  # nothing above the largest output
    thr[8] = -0.3
    return x, thr


def _dense_keys(x, thr, dst):
    on = pil_bilinear(x, dst).double() > thr.view(-1, 1, 1)
    return torch.nonzero(on.view(-1)).squeeze(1)


def _sparse_keys(x, thr, dst, max_elements=1 << 23):
    keys = [m * (dst[0] * dst[1]) + p for m, p in pil_mask_pixels(x, thr, dst, max_elements)]
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
    assert keys.dtype == torch.int64 and keys.unique().numel() == keys.numel()  # every pixel once
    return keys.sort().values


@pytest.mark.parametrize("src,dst", SIZES + [((40, 12), (9, 10))])
def test_pil_mask_pixels_equals_dense_expression(src, dst):
    for seed in range(2):
        x, thr = _adversarial(src, dst, seed)
        want = _dense_keys(x, thr, dst)
        assert want.numel() > 0
        assert torch.equal(_sparse_keys(x, thr, dst), want)
        assert torch.equal(_sparse_keys(x, thr, dst, max_elements=4000), want)  # many chunks


def test_pil_mask_pixels_float64_threshold_is_not_rounded():
    src, dst = (13, 13), (112, 112)
    x = _maps(src, 8)[:1]
    value = pil_bilinear(x, dst)[0, 50, 60]
    thr64 = _between_floats(value).view(1)
    keys64 = _sparse_keys(x, thr64, dst)
    keys32 = _sparse_keys(x, thr64.float(), dst)
    assert 50 * 112 + 60 in keys64.tolist() and 50 * 112 + 60 not in keys32.tolist()
    assert torch.equal(keys64, _dense_keys(x, thr64, dst))


def test_pil_mask_pixels_infinities_and_nan():
    x, thr = _adversarial((9, 11), (40, 37), 9)
    x[0, 2, 3], x[1, 0, 0], x[2, 4, 4], x[5, :, 1] = float("inf"), float("nan"), -float("inf"), float("nan")
    assert torch.equal(_sparse_keys(x, thr, (40, 37)), _dense_keys(x, thr, (40, 37)))


def test_pil_mask_pixels_rejects_bad_input():
    with pytest.raises(InputError, match="thresholds"):
        list(pil_mask_pixels(torch.zeros(3, 4, 4), torch.zeros(2), (8, 8)))
    with pytest.raises(InputError, match="size"):
        list(pil_mask_pixels(torch.zeros(3, 4, 4), torch.zeros(3), (8, 0)))


# ---------------------------------------------------------------- IoUTally.add_activations(upsample="pil")

NUM_LABELS, NUM_CATS = 300, 3


def _labels(b: int, size: tuple[int, int], gen: torch.Generator):
    cat = torch.full((NUM_LABELS,), -1, dtype=torch.int64)
    cat[torch.tensor([5, 17, 130, 250, 299])] = torch.tensor([0, 1, 1, 2, 0])
    ids = torch.tensor([0, 5, 17, 130, 250, 99])
    coarse = ids[torch.randint(0, len(ids), (b, 2, size[0] // 4 + 1, size[1] // 4 + 1), generator=gen)]
    labels = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :size[0], :size[1]].int()
    image_labels = torch.tensor([0, 299, 17])[torch.randint(0, 3, (b, 2), generator=gen)]
    return cat, labels, image_labels


@pytest.mark.parametrize("union", ["lite", "original"])
def test_add_activations_pil_equals_dense_pil_masks(union):
    gen = torch.Generator().manual_seed(11)
    b, u, src, size = 4, 5, (7, 7), (30, 29)
    acts = torch.relu(torch.randn(b, u, *src, generator=gen))
    up = pil_bilinear(acts, size)  # (B, U, 30, 29)
    per_unit = up.transpose(0, 1).reshape(u, -1)
    thr = torch.quantile(per_unit.double(), 0.95, dim=1)
    # unit 1: between two float32 values, a quarter ulp below one the maps reach
    thr[1] = _between_floats(per_unit[1].sort().values[-20])
    thr[2] = 0.0
    cat, labels, image_labels = _labels(b, size, gen)
    dense = up.double() > thr.view(1, u, 1, 1)
    assert dense.any() and not dense.all()
    want = IoUTally(u, cat, NUM_CATS, union=union)
    want.add(dense, labels, image_labels)
    rounded = IoUTally(u, cat, NUM_CATS, union=union)
    rounded.add(up > thr.float().view(1, u, 1, 1), labels, image_labels)
    assert not torch.equal(rounded.intersection, want.intersection) or \
        not torch.equal(rounded.activation, want.activation)  # the float64 comparison matters here
    for chunk in (1 << 22, 64):
        got = IoUTally(u, cat, NUM_CATS, union=union, chunk_elements=chunk)
        got.add_activations(acts[:1], thr, labels[:1], image_labels[:1], upsample="pil")
        got.add_activations(acts[1:], thr, got.prepare_labels(labels[1:], image_labels[1:]), upsample="pil")
        for name in ("truth", "intersection", "activation"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_add_activations_rejects_unknown_upsample_mode():
    cat, labels, image_labels = _labels(1, (8, 8), torch.Generator().manual_seed(0))
    tally = IoUTally(2, cat, NUM_CATS)
    with pytest.raises(InputError, match="upsample must be one of torch, pil, got 'scipy'"):
        tally.add_activations(torch.zeros(1, 2, 4, 4), torch.zeros(2), labels, image_labels, upsample="scipy")
    assert tally.images == 0
