"""Which input size a dissection feeds the model, and why (recorded in summary.json's model block).

A 224-px network fed 64-px images sees objects a few pixels wide and finds almost no
detectors, without any error. When the model's native input size is known (a cgl-train
checkpoint, torchvision weights, a timm config), the images differ from it by more than
MAX_RATIO in either side and --input-size is not given, `--input-size-rule` decides: `native`
resizes to the model's size with a warning, `fail` refuses and asks for --input-size.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from broden.errors import InputError

__all__ = ["MAX_RATIO", "data_image_size", "decide_input_size"]

log = logging.getLogger(__name__)

MAX_RATIO = 2.0  # "more than 2x apart": a 32-px checkpoint on 64-px images is still fine


def data_image_size(dataset: Any) -> tuple[int, int] | None:
    """(height, width) of the dataset's images from its first selected row (index.csv's ih, iw), or None."""
    try:
        if len(dataset) == 0:
            return None
        record = dataset.record(0)
    except (AttributeError, TypeError):
        return None
    return int(record.ih), int(record.iw)


def _ratio(native: int, size: tuple[int, int]) -> float:
    return max(max(native / s, s / native) for s in size)


def decide_input_size(loaded: Any, data_size: tuple[int, int] | None, input_size: int | None,
                      rule: str) -> Any:
    """A copy of `loaded` whose input_size is the one to use, with `input_size_decision` saying why.

    `input_size`: the explicit --input-size (None when not given: it always wins). `rule`: 'native'
    or 'fail' (DissectConfig.input_size_rule), applied only when the native size is known and the
    images differ from it by more than MAX_RATIO.
    """
    native = loaded.native_input_size
    record: dict[str, Any] = {"used": loaded.input_size, "native": native,
                              "data": list(data_size) if data_size else None, "rule": rule}
    if input_size is not None:
        record.update(used=input_size, reason="--input-size given")
    elif native is None:
        record["reason"] = ("the model's native input size is unknown: " +
                            (f"images resized to {loaded.input_size} as loaded" if loaded.input_size else
                             "images fed at their own size"))
        if data_size and not loaded.input_size:
            # a 224-px network fed 64-px images finds few detectors: say what it is fed
            log.info("the model's native input size is unknown: feeding the images at %dx%d px (pass "
                     "--input-size N if it was trained at another size)", *data_size)
    elif data_size is None or _ratio(native, data_size) <= MAX_RATIO:
        record["reason"] = "the model's native input size (the images are within 2x of it)"
    else:
        h, w = data_size
        where = loaded.origins.get("input_size") or "the model"
        if rule == "fail":
            raise InputError(f"--input-size: the images are {h}x{w} px but the model's native input size is "
                             f"{native} (from the {where}), more than {MAX_RATIO:g}x apart; pass --input-size N "
                             f"(--input-size {native}: the model's size; --input-size {max(h, w)}: the images' "
                             f"size), or --input-size-rule native to resize to {native}")
        log.warning("the images are %dx%d px, more than %gx off the model's native input size %d (from the %s): "
                    "resizing them to %d (--input-size-rule native); pass --input-size N to choose",
                    h, w, MAX_RATIO, native, where, native)
        record.update(used=native, reason=f"more than {MAX_RATIO:g}x off the native size: resized to it "
                                          f"(--input-size-rule native)")
    origins = dict(loaded.origins)
    if input_size is not None:
        origins["input_size"] = "--input-size"
        # loaders apply --input-size themselves; a LoadedModel built for another size stays as it is, so
        # that dissect.pipeline.effective_config refuses the contradiction
        return dataclasses.replace(loaded, origins=origins, input_size_decision=record)
    return dataclasses.replace(loaded, input_size=record["used"], origins=origins, input_size_decision=record)
