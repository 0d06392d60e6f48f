"""Every option of a dissection, in one dataclass saved beside every result.

Defaults are the reference's values (NetDissect-Lite, see
../shared/design/netdissect.md section 2); each choice that changes a
scientific result is a field here, so outputs say how they were made.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from broden.errors import InputError

__all__ = ["DissectConfig", "RESULT_FIELDS", "OPTION_FLAGS", "INTERPOLATIONS", "UNIONS", "DETECTOR_RULES",
           "KEEP_ACTIVATIONS", "passes_rule"]

# numpy.quantile(method=...) names we reproduce; hazen is Hyndman-Fan type 5, the reference's.
INTERPOLATIONS = ("hazen", "linear", "lower", "higher", "nearest")
UNIONS = ("lite", "original")
DETECTOR_RULES = (">=", ">")
KEEP_ACTIVATIONS = ("auto", "yes", "no")

# Field -> the `dissect run` flag that sets it, so errors name what the user typed.
OPTION_FLAGS = {
    "top_fraction": "--quantile", "interpolation": "--interpolation", "union": "--union",
    "iou_threshold": "--iou-threshold", "detector_rule": "--detector-rule", "unique_rule": "--unique-rule",
    "categories": "--categories", "split": "--split", "limit": "--limit", "top_k": "--top-k",
    "batch_size": "--batch-size", "seed": "--seed", "device": "--device",
    "keep_activations": "--keep-activations", "activation_budget_mb": "--activation-budget-mb",
    "normalize": "--normalize", "input_size": "--input-size", "layers": "--layers", "groups": "--groups",
    "group_alpha": "--group-alpha", "group_threshold": "--group-threshold", "save_every": "--save-every",
    "save_interval_s": "--save-interval",
}


@dataclass
class DissectConfig:
    """Options of one dissection run (defaults reproduce NetDissect-Lite)."""

    top_fraction: float = 0.005          # threshold T_k = quantile at level 1 - top_fraction of all N*h*w values
    interpolation: str = "hazen"         # quantile interpolation (hazen = type 5, the reference's; numpy names)
    union: str = "lite"                  # 'lite': category present under the mask; 'original': anywhere in the image
    iou_threshold: float = 0.04          # a unit is a detector when its top label's IoU passes this
    detector_rule: str = ">="            # '>=' (Lite's report) or '>' (the paper's plotting scripts)
    unique_rule: str = ">"               # rule of the 'paper' unique-detector count (its scripts use '>')
    categories: list[str] | None = None  # categories to label with (None: every category of the dataset)
    split: str | None = None             # 'train'/'val' subset of index.csv (None: all images, as the reference)
    limit: int | None = None             # first N images only (quick looks; None: all)
    top_k: int = 10                      # images kept per unit for reports (highest spatial-max activation)
    batch_size: int = 64                 # images per forward pass (does not change results)
    seed: int = 0                        # seeds torch/numpy; the engine itself is deterministic
    device: str = "auto"                 # 'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...
    keep_activations: str = "auto"       # reuse stage-1 activations in stage 2: 'auto' (under budget), 'yes', 'no'
    activation_budget_mb: int = 2048     # memory allowed for kept activations when keep_activations='auto'
    normalize: str | None = None         # 'imagenet'|'lite'|'none'; None: the checkpoint's, else imagenet
    input_size: int | None = None        # resize images to this square size (bilinear, antialias); None: as stored
    layers: list[str] | None = None      # dotted module names; None: the checkpoint's grouped layers, else every Conv2d
    groups: int | None = None            # G equal contiguous groups per layer (None: the checkpoint's groups, if any)
    group_alpha: float = 0.5             # aligned concept score = alpha*detector fraction + (1-alpha)*mean IoU
    group_threshold: float = 0.3         # a group is aligned to its best concept when the score reaches this
    save_every: int = 50                 # batches between saved run states (resume granularity; no effect on results)
    save_interval_s: float = 60.0        # ... and at least this many seconds since the last save (0: every time)

    def validate(self) -> "DissectConfig":
        """Raise InputError naming the first option with a bad value; return self."""
        def bad(name: str, expected: str) -> InputError:
            # the flag for CLI users, the field for Python API users
            return InputError(f"{OPTION_FLAGS.get(name, name)} {getattr(self, name)!r} (option {name}): "
                              f"expected {expected}")

        if not 0.0 < self.top_fraction < 1.0:
            raise bad("top_fraction", "a fraction in (0, 1), e.g. 0.005")
        for name, allowed in (("interpolation", INTERPOLATIONS), ("union", UNIONS),
                              ("detector_rule", DETECTOR_RULES), ("unique_rule", DETECTOR_RULES),
                              ("keep_activations", KEEP_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise bad(name, "one of " + ", ".join(allowed))
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise bad("iou_threshold", "a number in [0, 1]")
        for name in ("top_k", "batch_size", "save_every"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "a positive integer")
        if self.limit is not None and self.limit < 1:
            raise bad("limit", "a positive integer or None")
        if self.input_size is not None and self.input_size < 1:
            raise bad("input_size", "a positive integer or None")
        if self.groups is not None and self.groups < 1:
            raise bad("groups", "a positive integer or None")
        if not 0.0 <= self.group_alpha <= 1.0:
            raise bad("group_alpha", "a number in [0, 1]")
        # the aligned-concept score is a convex mix of a fraction and a mean IoU, so it lies in [0, 1]
        if not 0.0 <= self.group_threshold <= 1.0:
            raise bad("group_threshold", "a number in [0, 1] (the score mixes a detector fraction and a mean IoU)")
        if self.split not in (None, "train", "val"):
            raise bad("split", "'train', 'val' or None")
        if self.save_interval_s < 0:
            raise bad("save_interval_s", "a non-negative number of seconds")
        if self.activation_budget_mb < 0:
            raise bad("activation_budget_mb", "a non-negative number of MiB")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DissectConfig":
        """Build from a dict (e.g. summary.json 'options'); unknown keys are an InputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown dissection options {unknown}; valid: {sorted(names)}")
        return cls(**d).validate()

    def result_key(self) -> str:
        """Hash of the options that change results (device, batch size and bookkeeping excluded)."""
        d = {k: v for k, v in self.to_dict().items() if k in RESULT_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Options whose value can change a number in the outputs: they key caches and resumed states.
RESULT_FIELDS = frozenset({
    "top_fraction", "interpolation", "union", "iou_threshold", "detector_rule", "unique_rule",
    "categories", "split", "limit", "top_k", "normalize", "input_size", "layers", "groups",
    "group_alpha", "group_threshold", "seed"})


def passes_rule(value: Any, threshold: float, rule: str) -> Any:
    """`value >= threshold` or `value > threshold` by rule name; works on floats, arrays, tensors."""
    if rule == ">=":
        return value >= threshold
    if rule == ">":
        return value > threshold
    raise InputError(f"detector rule {rule!r}: expected one of {', '.join(DETECTOR_RULES)}")
