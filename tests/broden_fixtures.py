"""A tiny Broden-format directory covering every cell form, for tests across the project.

Use: `from broden_fixtures import make_tiny_broden` then `root = make_tiny_broden(tmp_path / "broden")`.
`tiny_broden_spec(seed)` returns the exact content written, so tests can compare
what they read against what was written.

What it holds (8x8 images, 4x4 label maps, Broden's six categories):
- color on every image (every pixel labeled), 7 rows, both splits;
- object layers with ids above 255 (glass = 300, so the G channel is used);
- two part layers on one image (name_part.png, name_part_1.png);
- material with id 513; scene as one image-level id; texture as two ("314;194");
- empty cells; one JPEG image (row 5), the rest PNG;
- glass listed in object and material with different coverage (primary: object,
  the larger), tile with equal coverage in both (primary: material, the later).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from broden.writer import BrodenWriter

__all__ = ["make_tiny_broden", "tiny_broden_spec", "write_raw_png", "TINY_CATEGORIES", "TINY_LABELS",
           "TINY_PRIMARY", "TINY_IMAGE_SIZE", "TINY_LABEL_SIZE"]

TINY_CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
TINY_IMAGE_SIZE = 8
TINY_LABEL_SIZE = 4

# id -> (name, explicit coverage per category or None to let the writer measure it)
TINY_LABELS: dict[int, tuple[str, dict[str, float] | None]] = {
    1: ("red", None), 2: ("green", None), 3: ("blue", None),
    4: ("wall", None), 5: ("door", None),
    6: ("handle", None), 7: ("knob", None),
    8: ("wood", None),
    9: ("tile", {"object": 0.25, "material": 0.25}),  # tie: primary goes to the later category
    194: ("dotted", None), 314: ("striped", None),
    300: ("glass", {"object": 0.6, "material": 0.2}),  # in two categories, object larger
    400: ("kitchen", None), 401: ("street", None),
    513: ("metal", None),
}
# expected primary category of every label, by hand
TINY_PRIMARY = {1: "color", 2: "color", 3: "color", 4: "object", 5: "object", 6: "part", 7: "part",
                8: "material", 9: "material", 194: "texture", 314: "texture", 300: "object",
                400: "scene", 401: "scene", 513: "material"}


def _plane(rng: np.random.Generator, ids: list[int]) -> np.ndarray:
    return rng.choice(np.asarray(ids, dtype=np.int32), size=(TINY_LABEL_SIZE, TINY_LABEL_SIZE))


def tiny_broden_spec(seed: int = 0) -> list[dict]:
    """The rows of the tiny dataset: name, split, image (H, W, 3) uint8, layers, image_labels, image_format."""
    rng = np.random.default_rng(seed)
    s = TINY_IMAGE_SIZE

    def image() -> np.ndarray:
        return rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)

    color = [1, 2, 3]
    rows = [
        {"name": "img0", "split": "train",
         "layers": {"color": [_plane(rng, color)], "object": [_plane(rng, [0, 4, 300])],
                    "part": [_plane(rng, [0, 6]), _plane(rng, [0, 7])], "material": [_plane(rng, [0, 8, 300])]},
         "image_labels": {"scene": [400], "texture": [314, 194]}},
        {"name": "img1", "split": "train",
         "layers": {"color": [_plane(rng, color)], "object": [_plane(rng, [4, 5, 9])]},
         "image_labels": {"scene": [401]}},
        {"name": "img2", "split": "val",
         "layers": {"color": [_plane(rng, color)], "part": [_plane(rng, [0, 7])],
                    "material": [_plane(rng, [0, 513, 9])]},
         "image_labels": {"texture": [194]}},
        {"name": "img3", "split": "val",
         "layers": {"color": [_plane(rng, color)]}, "image_labels": {}},
        {"name": "img4", "split": "train",
         "layers": {"color": [_plane(rng, color)], "object": [_plane(rng, [0, 300])]},
         "image_labels": {"scene": [400], "texture": [314]}},
        {"name": "img5", "split": "val",
         "layers": {"color": [_plane(rng, color)], "material": [_plane(rng, [8, 513])]},
         "image_labels": {"scene": [401]}, "image_format": "jpg"},
        {"name": "img6", "split": "train",
         "layers": {"color": [_plane(rng, color)], "object": [_plane(rng, [0, 5])],
                    "part": [_plane(rng, [0, 6, 7]), _plane(rng, [0, 6]), _plane(rng, [7])]},
         "image_labels": {"texture": [194, 314]}},
    ]
    for row in rows:
        row["image"] = image()
        row.setdefault("image_format", "png")
    return rows


def make_tiny_broden(root: Path, seed: int = 0) -> Path:
    """Write the tiny Broden directory at `root` (created) and return `root`."""
    root = Path(root)
    writer = BrodenWriter(root, TINY_CATEGORIES)
    for number, (name, coverage) in TINY_LABELS.items():
        writer.add_label(number, name, coverage=coverage)
    for row in tiny_broden_spec(seed):
        writer.add_image(row["name"], row["image"], split=row["split"], layers=row["layers"],
                         image_labels=row["image_labels"], image_format=row["image_format"])
    writer.close()
    return root


_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)


def write_raw_png(path: Path, pixels: np.ndarray, bits: int = 16) -> Path:
    """Write `pixels` ((h, w) or (h, w, c), c in 1..4) as a PNG of `bits` per channel, by hand.

    Pillow cannot write 16-bit RGB(A) or gray+alpha PNGs, so tests of high-bit-depth
    decoding build the file from its chunks (no filtering, one IDAT).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    h, w, c = pixels.shape
    dtype = ">u2" if bits == 16 else "u1"
    raw = b"".join(b"\0" + pixels[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bits, _PNG_COLOR_TYPE[c], 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))
    return Path(path)
