"""Per-unit thresholds read from files (`--thresholds LAYER=FILE`) instead of computed in stage 1.

A file is a .npy array of shape (units,): NetDissect-Lite's quantile.npy (float64) or our own
thresholds.npy (float32). Its dtype is kept, so with `--upsample pil` the float32 upsampled maps
are compared with Lite's float64 thresholds exactly as Lite compared them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from broden.errors import InputError
from dissect.config import file_sha256, threshold_specs

__all__ = ["GivenThresholds", "assign_threshold_files", "load_given_thresholds"]

FLAG = "--thresholds"


@dataclass(frozen=True)
class GivenThresholds:
    """One layer's thresholds as read from its file."""

    layer: str
    file: str            # absolute path
    sha256: str          # of the file's bytes
    values: np.ndarray   # (U,) float32 or float64, as stored

    def record(self) -> dict[str, str]:
        """The summary.json description of where the layer's thresholds came from."""
        return {"file": self.file, "sha256": self.sha256, "dtype": str(self.values.dtype),
                "values": "thresholds_given.npy"}


def assign_threshold_files(values: list[str], layers: list[str]) -> dict[str, str]:
    """Layer -> absolute file path for the --thresholds entries, checked against the dissected `layers`.

    A plain FILE names the one dissected layer; each layer may be given once.
    """
    out: dict[str, str] = {}
    for layer, path in threshold_specs(values):
        if layer is None:
            if len(layers) != 1:
                raise InputError(f"{FLAG} {path}: a plain FILE needs exactly one dissected layer, but "
                                 f"{len(layers)} are dissected ({', '.join(layers)}); write LAYER=FILE")
            layer = layers[0]
        if layer not in layers:
            raise InputError(f"{FLAG} {layer}={path}: layer {layer!r} is not dissected; dissected layers: "
                             f"{', '.join(layers)}")
        if layer in out:
            raise InputError(f"{FLAG}: layer {layer!r} is given twice ({out[layer]} and {path})")
        out[layer] = os.path.abspath(path)
    return {name: out[name] for name in layers if name in out}  # network order


def _read(layer: str, path: str, units: int) -> np.ndarray:
    expected = f"expected a .npy array of shape ({units},): one threshold per unit of {layer}"
    where = f"{FLAG} {layer}={path}"
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file; {expected}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: not a readable .npy file ({e}); {expected}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise InputError(f"{where}: holds an .npz archive; {expected}")
    if arr.shape != (units,):
        raise InputError(f"{where}: shape {arr.shape}; {expected}")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{where}: dtype {arr.dtype}; {expected} (float32 or float64)")
    if arr.dtype.kind != "f" or arr.dtype.itemsize < 4:
        arr = arr.astype(np.float64)  # integers and float16 hold exactly in float64
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InputError(f"{where}: {bad.size} non-finite value(s), e.g. unit {int(bad[0])} (0-based) is "
                         f"{arr[bad[0]]}; {expected}, all finite")
    return np.ascontiguousarray(arr)


def load_given_thresholds(values: list[str], layers: Iterable[str],
                          units: Mapping[str, int]) -> dict[str, GivenThresholds]:
    """Read and check every --thresholds file against its layer's unit count (`units[layer]`)."""
    out = {}
    for layer, path in assign_threshold_files(values, list(layers)).items():
        arr = _read(layer, path, int(units[layer]))  # first: its errors say what the file must hold
        out[layer] = GivenThresholds(layer, path, file_sha256(path, f"{FLAG} {layer}={path}"), arr)
    return out
