"""Every option of a `cgl-train` run, in one dataclass saved in every checkpoint.

Defaults follow the paper and its authors' code where they say something
(SGD, momentum 0.9, lr 0.01, weight decay 1e-4, G = 5, r = 3f pairs, paper
form of L_g, pixel coordinates for L_s, fixed P1 = 1, P2 = 0); the lambdas
default to 0, i.e. the weight-decay baseline, so CGL terms are switched on
explicitly. Where the paper is silent (epochs, batch size, schedule) the
choice is documented beside the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from broden.errors import InputError
from dissect.options import Options, option

__all__ = ["TrainConfig", "CGLOptions", "LR_SCHEDULES", "LABELINGS", "GROUP_FORMS", "SPATIAL_COORDS",
           "BLOCK_NORM_MODES", "LAYER_REDUCTIONS", "SYNTHETIC_NORMALIZATIONS", "RESUME_MAY_DIFFER", "EPOCH_DEPENDENT_SCHEDULES", "FLAG_GROUPS",
           "resume_conflicts", "check_resumable", "parse_layer_ints"]

LR_SCHEDULES = ("cosine", "step", "constant")
LABELINGS = ("binary", "classes45")
GROUP_FORMS = ("paper", "per_image")
SPATIAL_COORDS = ("pixel", "normalized")
BLOCK_NORM_MODES = ("penalty", "proximal")
LAYER_REDUCTIONS = ("mean", "sum")
SYNTHETIC_NORMALIZATIONS = ("train_stats", "half")
# Fields that may change when a run is resumed without changing what the run computes.
# `epochs` extends the run, allowed only when the LR schedule does not depend on it (see
# check_resumable); `workers` is safe because every sample's augmentation is seeded by
# (seed, epoch, index) whatever process loads it (engine.SeededSamples); the rest are logistics
# (`monitor` computes log-only terms from a pair generator of its own).
RESUME_MAY_DIFFER = ("epochs", "resume", "workers", "image_memory_mb", "quiet", "device", "out",
                     "synthetic_dir", "val_every", "max_val_batches", "monitor")
# Schedules whose learning rate at an epoch depends on the total `epochs` (cosine anneals to 0
# at `epochs`): changing `epochs` on resume would not reproduce a run trained that long.
EPOCH_DEPENDENT_SCHEDULES = ("cosine",)
# argparse group titles of `cgl-train --help`, in order
FLAG_GROUPS = {"data": "data and model", "optim": "optimisation", "groups": "concept groups", "run": "run"}


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


def _layer_ints_flag(field: str, table: str, flag: str) -> Callable[[str], dict[str, Any]]:
    """Opt.parse of --groups / --free: a default for every layer and per-layer values."""
    def parse(text: str) -> dict[str, Any]:
        default, per_layer = parse_layer_ints(text, flag)
        values: dict[str, Any] = {table: per_layer}
        if default is not None:
            values[field] = default
        return values
    return parse


@dataclass
class CGLOptions(Options):
    """Every CGL setting that changes a result; defaults are the paper's, or the authors' code where the
    paper leaves it open (layer_reduction: the mean over layers; design/cgl.md).

    Declared once here: TrainConfig inherits these fields (so they are cgl-train flags and
    recorded options), and the losses (cgl_train.losses.CGLObjective) take this object.
    """

    lambda_bn: float = option(0.0, "weight of the block norm R_bn (authors: 1e-3, 5e-3, 1e-2)", low=0.0,
                              results=True, group="groups")
    lambda_g: float = option(0.0, "weight of the group activation loss L_g (authors: 1e-3 on the toy set)",
                             low=0.0, results=True, group="groups")
    lambda_s: float = option(0.0, "weight of the spatial loss L_s (authors: 1e-2)", low=0.0, results=True,
                             group="groups")
    pairs_per_filter: int = option(3, "r = this * f random pairs per group and step (paper: 3)", low=1,
                                   results=True, group="groups")
    group_form: str = option("paper", "L_g norms over batch+space ('paper') or per image (authors' code)",
                             choices=GROUP_FORMS, results=True, group="groups")
    spatial_coords: str = option("pixel", "L_s coordinates: 'pixel' (authors' code) or 'normalized' (divided "
                                 "by max(H, W))", choices=SPATIAL_COORDS, results=True, group="groups")
    learn_p: bool = option(False, "learn the shared P1, P2 of psi (default fixed at 1 and 0, as the authors)",
                           results=True, group="groups")
    group_layers: str = option(
        "grouped", "layers L_g applies to: 'grouped' (all grouped layers), 'last', or conv names 'conv1,conv2' "
        "(the authors' toy network: conv2); R_bn always covers every grouped layer",
        expected="'grouped', 'last' or comma-separated conv layer names", results=True, group="groups")
    spatial_layers: str = option(
        "grouped", "layers L_s applies to: 'grouped' (all, as the authors), 'last', or conv names 'conv1,conv2'",
        expected="'grouped', 'last' or comma-separated conv layer names", results=True, group="groups")
    layer_reduction: str = option(
        "mean", "how L_g and L_s combine over the layers they act on: 'mean' (the authors' code) or 'sum' "
        "(R_bn always sums, eq. 6)", choices=LAYER_REDUCTIONS, results=True, group="groups")
    psi_eps: float = option(1e-5, "epsilon added to S (std variant of psi) and minimum |gamma| (BN variant)",
                            low=0.0, results=True, group="groups")
    block_norm_mode: str = option(
        "penalty", "apply R_bn as a proximal group soft-threshold (lr * lambda_bn) after each step instead of "
        "its gradient", flag="--prox", const="proximal", choices=BLOCK_NORM_MODES, results=True, group="groups")

    def __post_init__(self) -> None:
        # the losses take a CGLOptions as given, so it is checked when made; a TrainConfig is
        # checked by validate(), once flags and config files are merged
        if type(self) is CGLOptions:
            self.validate()

    def _check(self, source: str | None) -> None:
        for name in ("group_layers", "spatial_layers"):
            if not getattr(self, name).strip():
                raise self.bad(source, name, "'grouped', 'last' or comma-separated conv layer names")

    def _layer_names(self, option: str, layer_groups: Sequence[Any]) -> list[str]:
        grouped = [lg.name for lg in layer_groups]
        value = getattr(self, option)
        if value == "grouped":
            return grouped
        if value == "last":
            return grouped[-1:]
        names = [n.strip() for n in value.split(",") if n.strip()]
        missing = [n for n in names if n not in grouped]
        if missing:
            raise InputError(f"CGL option {option!r}: {missing} are not grouped layers; grouped layers: {grouped}")
        return names

    def group_layer_names(self, layer_groups: Sequence[Any]) -> list[str]:
        """The conv names L_g applies to, resolved against the grouped layers."""
        return self._layer_names("group_layers", layer_groups)

    def spatial_layer_names(self, layer_groups: Sequence[Any]) -> list[str]:
        """The conv names L_s applies to, resolved against the grouped layers."""
        return self._layer_names("spatial_layers", layer_groups)

    def cgl_options(self) -> "CGLOptions":
        """The CGL options alone (a TrainConfig's loss settings, for the losses and the logs)."""
        return CGLOptions(**{name: getattr(self, name) for name in CGLOptions.option_names()})


@dataclass
class TrainConfig(CGLOptions):
    """Options of one training run: the CGL options (CGLOptions) and everything else about the run."""

    data: str = option("synthetic", "'synthetic' (the paper's shapes, generated once), a directory written by "
                       "`dissect synth` (recorded as synthetic + --synthetic-dir) or an ImageFolder root with "
                       "train/ and val/ class folders", results=True, group="data")
    arch: str = option("tiny_cnn", "tiny_cnn, alexnet, alexnet_b or vgg16", results=True, group="data")
    out: str = option("runs/cgl", "output directory: log.jsonl, config.json, latest.pth, best.pth", group="data")
    arch_kwargs: dict[str, Any] = option(
        {}, "extra constructor arguments as JSON, e.g. '{\"width1\": 32, \"width2\": 64}' for tiny_cnn",
        example='{"width1": 64}', metavar="JSON", results=True, group="data")
    labeling: str = option("binary", "synthetic labels: 'binary' (a square is present, the paper's Table 1) "
                           "or 'classes45'", choices=LABELINGS, results=True, group="data")
    synthetic_dir: str | None = option(
        None, "where the synthetic set is generated or reused (default: $DISSECT_CACHE_DIR, else "
        "~/.cache/concept-dissect, then synthetic/<parameters>)", group="data")
    synthetic_per_class: int = option(640, "synthetic images per class of the 45 pairs (authors: 640)", low=1,
                                      results=True, group="data")
    synthetic_size: int = option(64, "synthetic image size in pixels (paper: 64)", low=1, results=True,
                                 group="data")
    synthetic_seed: int = option(0, "seed of the synthetic generator (independent of the training seed)",
                                 results=True, group="data")
    synthetic_val_fraction: float = option(0.2, "synthetic validation share (paper: 80/20)", low=0.0, high=1.0,
                                           open_bounds=True, expected="a number strictly between 0 and 1",
                                           results=True, group="data")
    synthetic_normalization: str = option(
        "train_stats", "input normalisation of the synthetic set: 'train_stats' (per-channel mean and std of the "
        "training split's pixels) or 'half' (mean 0.5, std 0.5: 0..255 to -1..1); recorded in the checkpoint, "
        "which the dissection applies", choices=SYNTHETIC_NORMALIZATIONS, results=True, group="data")
    input_size: int | None = option(None, "model input size (default: synthetic size, 224 for ImageFolder)",
                                    low=1, expected="a positive integer or null", results=True, group="data")
    epochs: int = option(30, "passes over the training set (paper silent; our choice)", low=1, results=True,
                         group="optim")
    batch_size: int = option(64, "GLOBAL minibatch, split across DDP ranks (paper silent; our choice)", low=1,
                             results=True, group="optim")
    lr: float = option(0.01, "SGD learning rate (authors: 0.01)", low=0.0, results=True, group="optim")
    momentum: float = option(0.9, "SGD momentum (authors: 0.9)", low=0.0, results=True, group="optim")
    weight_decay: float = option(1e-4, "L2 on every parameter R_bn does not cover (see above; authors' "
                                 "baselines: 1e-4)", low=0.0, results=True, group="optim")
    lr_schedule: str = option("cosine", "per-epoch schedule: 'cosine' (to 0 at --epochs), 'step', 'constant'",
                              choices=LR_SCHEDULES, results=True, group="optim")
    lr_step: int = option(30, "'step' schedule: multiply lr by --lr-gamma every this many epochs", low=1,
                          results=True, group="optim")
    lr_gamma: float = option(0.1, "'step' schedule factor", low=0.0, results=True, group="optim")
    plateau_epochs: int = option(
        0, "stop once validation top-1 moved less than --plateau-delta over the last this many epochs (and "
        "reached --plateau-min-top1); 0 trains all --epochs", low=0, results=True, group="optim")
    plateau_delta: float = option(0.005, "the plateau rule's largest change of validation top-1 (a fraction: "
                                  "0.005 = 0.5 points)", low=0.0, high=1.0, results=True, group="optim")
    plateau_min_top1: float | None = option(
        None, "the plateau rule stops only once validation top-1 reached this (a fraction)", low=0.0, high=1.0,
        expected="a number in [0, 1] or null", results=True, group="optim")
    amp: bool = option(False, "mixed precision: float16 autocast + GradScaler on CUDA; bfloat16 autocast on a "
                       "CPU with native bfloat16 (AVX512-BF16 or AMX; elsewhere float32, with a warning); the CGL "
                       "terms stay float32", results=True, group="optim")
    groups: int = option(5, "G per grouped layer: '5', 'conv1=5,conv2=8' or '5,conv2=8' (authors: 5)", low=1,
                         parse=_layer_ints_flag("groups", "group_overrides", "--groups"), results=True,
                         group="groups")
    group_overrides: dict[str, int] = option({}, "per-layer G, e.g. {\"conv1\": 5, \"conv2\": 8} (set with "
                                             "--groups)", flag=None, results=True)
    free: int | None = option(None, "free filters per layer, same syntax as --groups (default: the remainder "
                              "channels % G)", low=0, expected="a non-negative integer or null",
                              parse=_layer_ints_flag("free", "free_overrides", "--free"), results=True,
                              group="groups")
    free_overrides: dict[str, int] = option({}, "per-layer free filter counts (set with --free)", flag=None,
                                            results=True)
    layers: list[str] | None = option(None, "grouped conv layers, comma- or space-separated (default: every "
                                      "conv of the arch)", results=True, group="groups")
    monitor: bool = option(True, "also compute terms whose lambda is 0 (no gradient, own pair generator) for "
                           "the log; --no-monitor skips them (faster)", group="groups")
    seed: int = option(0, "seeds init, data order, augmentation, dropout and pair sampling", results=True,
                       group="run")
    workers: int = option(2, "DataLoader worker processes for an ImageFolder --data; no effect on results "
                          "(augmentation is seeded per sample); the synthetic set is served from memory without "
                          "workers", low=0, group="run")
    image_memory_mb: int = option(
        2048, "ImageFolder data: decode every image once, in parallel threads, and hold the pixels in memory "
        "when train + val fit in this many MiB (0: decode each item as it loads); no effect on results",
        metavar="MIB", low=0, group="run")
    device: str = option("auto", "'auto' (cuda when present), 'cpu', 'cuda', 'cuda:N'", group="run")
    val_every: int = option(1, "validate every N epochs (and always after the last)", low=1, group="run")
    max_train_batches: int | None = option(None, "stop each epoch after N batches (tests, smoke runs)", low=1,
                                           expected="a positive integer or null", results=True, group="run")
    max_val_batches: int | None = option(None, "validate on the first N batches only (tests, smoke runs)",
                                         low=1, expected="a positive integer or null", group="run")
    resume: bool = option(False, "continue the run in --out from latest.pth, exactly, with its recorded options "
                          "(see below)", group="run")
    quiet: bool = option(False, "no progress bars or info messages", group="run")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str | None = "config") -> "TrainConfig":
        """Build from a dict; unknown keys raise InputError naming them and `source`.

        Run records written before block_norm_mode existed say `prox: true/false`; read them as such.
        """
        values = dict(values) if isinstance(values, Mapping) else values
        if isinstance(values, dict) and "prox" in values and "block_norm_mode" not in values:
            values["block_norm_mode"] = "proximal" if values.pop("prox") else "penalty"
        return super().from_dict(values, source)

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

    def validate(self, source: str | None = "config") -> "TrainConfig":
        """Raise InputError naming the first bad option; return self."""
        return super().validate(source)  # type: ignore[return-value]

    def _check(self, source: str | None) -> None:
        from dissect.architectures import MODELS  # late: it imports torchvision

        super()._check(source)
        if self.arch not in MODELS:
            raise self.bad(source, "arch", f"one of {', '.join(sorted(MODELS))}")
        if self.layers is not None and not self.layers:
            raise self.bad(source, "layers", "a non-empty list of conv layer names or null")
        for layer, v in {**self.group_overrides, **self.free_overrides}.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{source}: per-layer count for {layer!r} is {v!r}; expected a non-negative integer")
        if self.plateau_epochs and self.val_every != 1:
            raise self.bad(source, "val_every", "1 when --plateau-epochs is set (the rule reads every epoch's "
                           "validation)")
        if self.block_norm_mode == "proximal" and self.lambda_bn <= 0:
            raise self.bad(source, "block_norm_mode", "'penalty' unless lambda_bn > 0 (the proximal step applies "
                           "R_bn)")


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
