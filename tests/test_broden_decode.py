"""Image and label-PNG decoding at every bit depth, the same in every path (no cache, cache build, validate)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from broden.cache import build_cache
from broden.dataset import BrodenDataset
from broden.errors import BrodenFormatError
from broden.format import decode_image, decode_label_png, validate
from broden_fixtures import make_tiny_broden, tiny_broden_spec, write_raw_png

ROW = 3  # img3: a PNG image, only a color layer (line 5 of index.csv)


def _gray16(rng: np.random.Generator, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit gray image and its expected 8-bit decoding (value >> 8), random low bytes."""
    high = rng.integers(0, 256, (size, size), dtype=np.uint16)
    low = rng.integers(0, 256, (size, size), dtype=np.uint16)
    return high * 256 + low, high.astype(np.uint8)


# --- decode_image, file by file ----------------------------------------------------------------

def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    value, want = _gray16(np.random.default_rng(0))
    Image.fromarray(value).save(tmp_path / "g.png")  # Pillow writes mode I;16 as a 16-bit gray PNG
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    got = decode_image(tmp_path / "g.png")
    assert got.dtype == np.uint8 and got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))


def test_16bit_rgb_and_rgba_png_keep_the_high_byte(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint16)
    low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint16)
    write_raw_png(tmp_path / "rgb.png", rgb * 256 + low)
    np.testing.assert_array_equal(decode_image(tmp_path / "rgb.png"), rgb.astype(np.uint8))
    alpha = np.full((4, 5, 1), 65535, dtype=np.uint16)
    write_raw_png(tmp_path / "rgba.png", np.concatenate([rgb * 256 + low, alpha], axis=2))
    np.testing.assert_array_equal(decode_image(tmp_path / "rgba.png"), rgb.astype(np.uint8))


@pytest.mark.parametrize("order", ["<", ">"])
def test_16bit_tiff_either_byte_order_is_scaled(tmp_path, order):
    value, want = _gray16(np.random.default_rng(2))
    path = tmp_path / "g.tif"
    Image.fromarray(value.astype(f"{order}u2")).save(path)
    got = decode_image(path)
    np.testing.assert_array_equal(got[..., 0], want)


def test_16bit_pgm_opened_as_mode_I_is_scaled(tmp_path):
    value, want = _gray16(np.random.default_rng(3))
    path = tmp_path / "g.pgm"
    path.write_bytes(b"P5\n8 8\n65535\n" + value.astype(">u2").tobytes())
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(decode_image(path)[..., 1], want)


@pytest.mark.parametrize("mode, array", [
    ("F", np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)),
    ("I", np.arange(16, dtype=np.int32).reshape(4, 4) * 1_000_000),
])
def test_images_of_unknown_range_are_refused(tmp_path, mode, array):
    path = tmp_path / f"{mode}.tif"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(BrodenFormatError) as e:
        decode_image(path)
    assert str(path) in str(e.value) and repr(mode) in str(e.value)


def test_8bit_modes_still_decode(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "l.png"), np.repeat(rgb[..., :1], 3, axis=2))
    with pytest.raises(BrodenFormatError, match=re.escape(str(tmp_path / "none.png"))):
        decode_image(tmp_path / "none.png")


# --- label PNGs stay 8-bit ---------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_label_png_is_refused(tmp_path, channels):
    ids = np.full((4, 4, channels), 3 * 256, dtype=np.uint16)  # high byte 3: a silent id 3 if truncated
    path = write_raw_png(tmp_path / "label.png", ids)
    with pytest.raises(BrodenFormatError) as e:
        decode_label_png(path)
    assert str(path) in str(e.value) and "16" in str(e.value) and "8-bit" in str(e.value)


def test_8bit_gray_alpha_label_png_is_refused(tmp_path):
    path = write_raw_png(tmp_path / "label.png", np.full((2, 2, 2), 5, dtype=np.uint8), bits=8)
    with pytest.raises(BrodenFormatError, match="label.png"):
        decode_label_png(path)


# --- one decoder in every path -----------------------------------------------------------------

@pytest.fixture
def gray16_broden(tmp_path, monkeypatch) -> tuple[Path, np.ndarray]:
    """The tiny fixture with img3 rewritten as a 16-bit gray PNG; returns (root, expected (3, 8, 8))."""
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tiny_broden(tmp_path / "broden")
    value, want = _gray16(np.random.default_rng(5))
    Image.fromarray(value).save(root / "images" / "synthetic" / "img3.png")
    return root, np.repeat(want[None], 3, axis=0)


def test_dataset_without_cache_scales_16bit_images(gray16_broden):
    root, want = gray16_broden
    ds = BrodenDataset(root, cache="off")
    np.testing.assert_array_equal(ds[ROW]["image"].numpy(), want)
    # the other rows are untouched
    spec = tiny_broden_spec()
    assert torch.equal(ds[0]["image"], torch.from_numpy(spec[0]["image"]).permute(2, 0, 1))


def test_cache_build_scales_16bit_images(gray16_broden):
    root, want = gray16_broden
    build_cache(root, progress=False)
    ds = BrodenDataset(root)
    assert ds.cache is not None
    np.testing.assert_array_equal(ds[ROW]["image"].numpy(), want)


def test_validate_decodes_with_the_same_rules(gray16_broden):
    root, _ = gray16_broden
    assert validate(root, decode=True) == []  # 16-bit: decoded correctly, not a problem
    path = root / "images" / "synthetic" / "img3.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(path, format="TIFF")  # mode F, .png name
    problems = validate(root, decode=True)
    assert len(problems) == 1
    assert "index.csv, line 5" in problems[0] and "img3.png" in problems[0] and "'F'" in problems[0]
    write_raw_png(root / "images" / "synthetic" / "img3_color.png", np.ones((4, 4, 3), dtype=np.uint16))
    problems = validate(root, decode=True)
    assert len(problems) == 2 and "img3_color.png" in problems[1] and "8-bit" in problems[1]
