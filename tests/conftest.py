"""Suite-wide fixtures: keep every test away from the user's real cache directory."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point DISSECT_CACHE_DIR at a session temp dir (tests that need their own set it again)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DISSECT_CACHE_DIR", str(tmp_path_factory.mktemp("dissect-cache")))
    yield
    mp.undo()
