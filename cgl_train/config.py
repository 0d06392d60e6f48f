"""Every option of a `cgl-train` run, in one dataclass saved in every checkpoint.

Defaults follow the paper and its authors' code where they say something
(SGD, momentum 0.9, lr 0.01, weight decay 1e-4, G = 5, r = 3f pairs, paper
form of L_g, pixel coordinates for L_s, fixed P1 = 1, P2 = 0); the lambdas
default to 0, i.e. the weight-decay baseline, so CGL terms are switched on
explicitly. Where the paper is silent (epochs, batch size, schedule) the
choice is documented beside the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broden.errors import InputError

__all__ = ["TrainConfig", "LR_SCHEDULES", "LABELINGS", "GROUP_FORMS", "SPATIAL_COORDS",
           "RESUME_MAY_DIFFER", "EPOCH_DEPENDENT_SCHEDULES", "resume_conflicts", "check_resumable",
           "parse_layer_ints"]

LR_SCHEDULES = ("cosine", "step", "constant")
LABELINGS = ("binary", "classes45")
GROUP_FORMS = ("paper", "per_image")
SPATIAL_COORDS = ("pixel", "normalized")
# Fields that may change when a run is resumed without changing what the run computes.
# `epochs` extends the run, allowed only when the LR schedule does not depend on it (see
# check_resumable); `workers` is safe because every sample's augmentation is seeded by
# (seed, epoch, index) whatever process loads it (engine.SeededSamples); the rest are logistics
# (`monitor` computes log-only terms from a pair generator of its own).
RESUME_MAY_DIFFER = ("epochs", "resume", "workers", "quiet", "device", "out",
                     "synthetic_dir", "val_every", "max_val_batches", "monitor")
# Schedules whose learning rate at an epoch depends on the total `epochs` (cosine anneals to 0
# at `epochs`): changing `epochs` on resume would not reproduce a run trained that long.
EPOCH_DEPENDENT_SCHEDULES = ("cosine",)


@dataclass
class TrainConfig:
    """Options of one training run."""

    data: str = "synthetic"              # 'synthetic' (the paper's shapes) or an ImageFolder root with train/ and val/
    arch: str = "tiny_cnn"               # a name in cgl_train.models.MODELS
    out: str = "runs/cgl"                # output dir: log.jsonl, config.json, latest.pth, best.pth
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor args (e.g. tiny_cnn width1/width2)
    labeling: str = "binary"             # synthetic labeling: 'binary' (a square is present, the paper's Table 1) or 'classes45'
    synthetic_dir: str | None = None     # where the synthetic set is generated/reused (None: $DISSECT_CACHE_DIR/synthetic/<parameters>)
    synthetic_per_class: int = 640       # images per class of the 45 pairs (authors: 640, 28,800 images)
    synthetic_size: int = 64             # synthetic image size in pixels (paper: 64)
    synthetic_seed: int = 0              # seed of the synthetic generator (independent of the training seed)
    synthetic_val_fraction: float = 0.2  # synthetic val share (paper: 80/20)
    input_size: int | None = None        # model input size; None: synthetic size, or 224 for ImageFolder
    epochs: int = 30                     # passes over the training set (paper silent; our choice)
    batch_size: int = 64                 # GLOBAL minibatch, split across DDP ranks (paper silent; our choice)
    lr: float = 0.01                     # SGD learning rate (authors: 0.01)
    momentum: float = 0.9                # SGD momentum (authors: 0.9)
    weight_decay: float = 1e-4           # L2 on every parameter R_bn does not cover (authors' baselines: 1e-4)
    lr_schedule: str = "cosine"          # per-epoch schedule: 'cosine' (to 0 at `epochs`), 'step', 'constant'
    lr_step: int = 30                    # 'step' schedule: multiply lr by lr_gamma every lr_step epochs
    lr_gamma: float = 0.1                # 'step' schedule factor
    groups: int = 5                      # G groups in every grouped layer (authors: 5)
    group_overrides: dict[str, int] = field(default_factory=dict)   # per-layer G, e.g. {"conv1": 5, "conv2": 8}
    free: int | None = None              # free filters per grouped layer (None: the remainder channels % G)
    free_overrides: dict[str, int] = field(default_factory=dict)    # per-layer free filter counts
    layers: list[str] | None = None      # grouped conv layers (None: every conv of the arch)
    lambda_bn: float = 0.0               # weight of the block norm R_bn (authors: 1e-3, 5e-3, 1e-2)
    lambda_g: float = 0.0                # weight of the group activation loss L_g (authors: 1e-3 on the toy set)
    lambda_s: float = 0.0                # weight of the spatial loss L_s (authors: 1e-2)
    pairs_per_filter: int = 3            # r = pairs_per_filter * f random pairs per group and step (paper: 3)
    group_form: str = "paper"            # L_g norms: 'paper' (over minibatch and space) or 'per_image' (authors' code)
    spatial_coords: str = "pixel"        # L_s coordinates: 'pixel' (authors' code) or 'normalized'
    spatial_layers: str = "grouped"      # layers L_s applies to: 'grouped' (all, as the authors), 'last', or 'conv1,conv2'
    learn_p: bool = False                # learn the shared P1, P2 of psi (default fixed at 1 and 0, as the authors)
    prox: bool = False                   # apply R_bn as a proximal group soft-threshold after each step instead of its gradient
    monitor: bool = True                 # also compute terms whose lambda is 0 (no gradient, own pair generator) for the log
    amp: bool = False                    # mixed precision (autocast + GradScaler); used on CUDA only
    seed: int = 0                        # seeds init, data order, augmentation, dropout and pair sampling
    workers: int = 2                     # DataLoader worker processes for ImageFolder data (no effect on results: per-sample seeded augmentation); the synthetic set is served from memory without workers
    device: str = "auto"                 # 'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...
    val_every: int = 1                   # validate every N epochs (and always after the last)
    max_train_batches: int | None = None  # stop each epoch after N batches (tests, smoke runs)
    max_val_batches: int | None = None   # validate on the first N batches only (tests, smoke runs)
    resume: bool = False                 # continue the run in `out` from latest.pth
    quiet: bool = False                  # no progress bars

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict; unknown keys raise InputError naming them and `source`."""
        if not isinstance(values, dict):
            raise InputError(f"{source}: expected a JSON object of options, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"{source}: unknown option(s) {unknown}; valid options: {', '.join(sorted(names))}")
        return cls(**values).validate(source)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        """Read a JSON file of options (any subset of the fields)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except OSError as e:
            raise InputError(f"{path}: cannot read config file: {e}") from e
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(values, str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()

    def validate(self, source: str = "config") -> "TrainConfig":
        """Raise InputError naming the first bad option; return self."""
        from cgl_train.models import MODELS  # late: models imports torchvision

        def bad(name: str, expected: str) -> InputError:
            return InputError(f"{source}: option {name!r} = {getattr(self, name)!r}; expected {expected}")

        if self.arch not in MODELS:
            raise bad("arch", f"one of {', '.join(sorted(MODELS))}")
        choices = {"labeling": LABELINGS, "lr_schedule": LR_SCHEDULES, "group_form": GROUP_FORMS,
                   "spatial_coords": SPATIAL_COORDS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise bad(name, f"one of {', '.join(valid)}")
        positive = ("epochs", "batch_size", "groups", "pairs_per_filter", "val_every", "lr_step",
                    "synthetic_per_class", "synthetic_size")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive integer")
        for name in ("max_train_batches", "max_val_batches", "input_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(name, "a positive integer or null")
        if self.free is not None and (not isinstance(self.free, int) or self.free < 0):
            raise bad("free", "a non-negative integer or null")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise bad("workers", "a non-negative integer")
        for name in ("lr", "lambda_bn", "lambda_g", "lambda_s", "weight_decay", "momentum", "lr_gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise bad(name, "a non-negative number")
        if not 0.0 < self.synthetic_val_fraction < 1.0:
            raise bad("synthetic_val_fraction", "a number strictly between 0 and 1")
        for name in ("group_overrides", "free_overrides", "arch_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a JSON object")
        for layer, v in {**self.group_overrides, **self.free_overrides}.items():
            if not isinstance(v, int) or v < 0:
                raise InputError(f"{source}: per-layer count for {layer!r} is {v!r}; expected a non-negative integer")
        if not isinstance(self.spatial_layers, str) or not self.spatial_layers.strip():
            raise bad("spatial_layers", "'grouped', 'last' or comma-separated conv layer names")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers):
            raise bad("layers", "a non-empty list of conv layer names or null")
        if self.prox and self.lambda_bn <= 0:
            raise bad("prox", "false unless lambda_bn > 0 (the proximal step applies R_bn)")
        return self


def resume_conflicts(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Names of the options outside RESUME_MAY_DIFFER whose values differ between two option dicts."""
    return sorted(k for k in set(saved) | set(now)
                  if k not in RESUME_MAY_DIFFER and saved.get(k) != now.get(k))


def check_resumable(saved: dict[str, Any], config: TrainConfig, source: str) -> None:
    """Raise InputError when `config` cannot continue the run recorded as `saved` (its train_options).

    Only RESUME_MAY_DIFFER may change, and `epochs` only under a schedule that
    does not depend on it: a cosine schedule anneals to 0 at `epochs`, so a run
    extended from 2 to 3 epochs would not equal a 3-epoch run (refused, not warned).
    """
    now = config.to_dict()
    differ = resume_conflicts(saved, now)
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise InputError(f"{source}: cannot resume with different options ({shown}); only "
                         f"{', '.join(RESUME_MAY_DIFFER)} may change")
    old_epochs = saved.get("epochs", config.epochs)
    if old_epochs != config.epochs and config.lr_schedule in EPOCH_DEPENDENT_SCHEDULES:
        raise InputError(f"{source}: cannot resume with epochs {old_epochs} -> {config.epochs}: the "
                         f"{config.lr_schedule!r} LR schedule depends on the number of epochs, so the "
                         f"learning rates already used would differ from those of a {config.epochs}-epoch "
                         f"run. Resume with --epochs {old_epochs}, or start a new run (the 'step' and "
                         f"'constant' schedules can be extended)")


def parse_layer_ints(text: str, option: str) -> tuple[int | None, dict[str, int]]:
    """Parse '5', 'conv1=5,conv2=8' or '5,conv2=8' into (default, {layer: value})."""
    default: int | None = None
    per_layer: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        try:
            number = int(value)
        except ValueError:
            raise InputError(f"option {option}: {part!r} is not an integer or LAYER=INTEGER "
                             f"(e.g. '5' or 'conv1=5,conv2=8')") from None
        if sep:
            per_layer[name.strip()] = number
        else:
            default = number
    return default, per_layer
