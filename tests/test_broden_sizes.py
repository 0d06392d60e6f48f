"""index.csv's ih/iw and sh/sw against the files, and one size per batch, the same with and without the cache."""
from __future__ import annotations

from pathlib import Path

import pytest

from broden.cache import build_cache, open_cache
from broden.dataset import BrodenDataset
from broden.errors import BrodenFormatError
from broden_fixtures import make_tiny_broden


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    return make_tiny_broden(tmp_path / "broden")


def _sizes(root: Path, old: str, new: str, lines: set[int] | None = None) -> None:
    """Replace the ih,iw,sh,sw cells `old` by `new` on the given 1-based lines (default: every row)."""
    index = root / "index.csv"
    out = []
    for n, text in enumerate(index.read_text().splitlines(keepends=True), start=1):
        if n > 1 and (lines is None or n in lines):
            assert f",{old}," in text, (n, text)
            text = text.replace(f",{old},", f",{new},", 1)
        out.append(text)
    index.write_text("".join(out))


def _says(error: pytest.ExceptionInfo, root: Path, *words: str) -> None:
    msg = str(error.value)
    for w in [str(root / "index.csv"), *words]:
        assert w in msg, (w, msg)


# --- item 3: the index's sizes are checked against the decoded files ---------------------------

def test_image_size_disagreeing_with_ih_iw_without_cache(root):
    _sizes(root, "8,8,4,4", "9,8,4,4")
    ds = BrodenDataset(root, cache="off")
    with pytest.raises(BrodenFormatError) as e:
        ds[3]
    _says(e, root, "line 5", "synthetic/img3.png", "8x8", "ih x iw = 9x8")


def test_image_size_disagreeing_with_ih_iw_in_cache_build(root):
    _sizes(root, "8,8,4,4", "8,7,4,4")
    with pytest.raises(BrodenFormatError) as e:
        build_cache(root, progress=False, workers=1)
    _says(e, root, "line 2", "synthetic/img0.png", "8x8", "ih x iw = 8x7")
    assert open_cache(root) is None  # nothing half-built is left to be read


def test_label_size_disagreeing_with_sh_sw_in_both_paths(root):
    _sizes(root, "8,8,4,4", "8,8,4,5")
    with pytest.raises(BrodenFormatError) as e:
        BrodenDataset(root, cache="off")[0]
    _says(e, root, "line 2", "img0_color.png", "4x4", "sh x sw = 4x5")
    with pytest.raises(BrodenFormatError) as e:
        build_cache(root, progress=False, workers=1)
    _says(e, root, "line 2", "img0_color.png", "4x4", "sh x sw = 4x5")
    assert open_cache(root) is None
