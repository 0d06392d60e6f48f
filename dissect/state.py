"""Resumable run state: stage progress saved atomically, keyed by everything that affects results.

A run directory `<out>/.dissect-state/<run_key>/rank<r>of<W>-bs<B>/` holds one file per
stage (`stage1.pt`, `stage2.pt`): the position of the next batch and the
state_dicts of the streaming statistics. A rerun of the same command after a kill
loads them and continues from that batch; the statistics are exact and the
batches identical, so the final results equal an uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from broden._fileio import atomic_path

__all__ = ["STATE_DIRNAME", "run_key", "RunState"]

log = logging.getLogger(__name__)

STATE_DIRNAME = ".dissect-state"
_STATE_VERSION = 1


def run_key(model_fingerprint: str, layers: list[str], dataset_fingerprint: str,
            options_key: str) -> str:
    """Hash of model fingerprint + layers + dataset fingerprint + result-changing options."""
    blob = json.dumps({"model": model_fingerprint, "layers": list(layers), "dataset": dataset_fingerprint,
                       "options": options_key, "version": _STATE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class RunState:
    """Saved progress of one rank of one run; `enabled=False` makes every call a no-op."""

    def __init__(self, out: str | Path | None, key: str, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        self.key = key
        self.enabled = out is not None
        self.root = Path(out) / STATE_DIRNAME / key if out is not None else None
        # positions are image indices on this rank's batch grid: another grid starts afresh
        where = f"rank{rank}of{world_size}-bs{batch_size}"
        self.dir = self.root / where if self.root is not None else None

    def _path(self, stage: str) -> Path:
        if self.dir is None:
            raise RuntimeError(f"run state {stage!r}: this RunState has no output directory (out=None); "
                               "check `enabled` before loading or saving")
        return self.dir / f"{stage}.pt"

    def load(self, stage: str) -> dict[str, Any] | None:
        """The saved state of `stage`, or None when there is none (or it is unreadable)."""
        if not self.enabled or not self._path(stage).is_file():
            return None
        try:
            data = torch.load(self._path(stage), map_location="cpu", weights_only=True)
        except Exception as e:  # a foreign or damaged file: start the stage afresh
            log.warning("ignoring unreadable run state %s: %s", self._path(stage), e)
            return None
        if not isinstance(data, dict):
            self.discard(stage, f"holds a {type(data).__name__}, not a saved state")
            return None
        if data.get("key") != self.key:
            return None
        log.info("resuming %s from %s (next batch at image %s)", stage, self._path(stage), data.get("next"))
        return data

    def discard(self, stage: str, reason: object) -> None:
        """Drop the saved state of `stage` that cannot be resumed from (incomplete or inconsistent), saying why."""
        path = self._path(stage)
        log.warning("ignoring run state %s (%s); recomputing %s from its start", path, reason, stage)
        path.unlink(missing_ok=True)

    def save(self, stage: str, data: dict[str, Any]) -> None:
        """Save `data` (tensors, numbers, strings, dicts) for `stage` atomically."""
        if not self.enabled:
            return
        payload = dict(data, key=self.key)
        with atomic_path(self._path(stage)) as tmp:
            torch.save(payload, tmp)

    def clear(self) -> None:
        """Remove this run's saved states (after the results are written)."""
        if self.enabled and self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            parent = self.root.parent
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
