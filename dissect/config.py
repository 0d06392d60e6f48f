"""Every option of a dissection, in one dataclass saved beside every result.

Defaults are the reference's values (NetDissect-Lite, see
../shared/design/netdissect.md section 2); each choice that changes a
scientific result is a field here, so outputs say how they were made.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broden.errors import InputError
from dissect.options import Options, option

__all__ = ["DissectConfig", "RESULT_FIELDS", "OPTION_FLAGS", "INTERPOLATIONS", "UNIONS", "DETECTOR_RULES",
           "KEEP_ACTIVATIONS", "NORMALIZE_NAMES", "IMAGE_RULES", "UPSAMPLE_MODES", "FLAG_GROUPS", "ARCH_HELP",
           "INPUT_SIZE_RULES", "DECODED_CACHE", "FINGERPRINTS", "TOP_IMAGE_TIEBREAKS", "LoadOptions",
           "RunSettings", "passes_rule", "threshold_specs", "file_sha256"]

# numpy.quantile(method=...) names we reproduce; hazen is Hyndman-Fan type 5, the reference's.
INTERPOLATIONS = ("hazen", "linear", "lower", "higher", "nearest")
UNIONS = ("lite", "original")
DETECTOR_RULES = (">=", ">")
KEEP_ACTIVATIONS = ("auto", "yes", "no")
NORMALIZE_NAMES = ("imagenet", "lite", "none")  # dissect.models.NORMALIZATIONS
IMAGE_RULES = ("annotated", "all")  # broden.dataset.IMAGE_RULES (that module imports torch)
# "torch": F.interpolate's float32 arithmetic; "pil": Pillow's BILINEAR bit for bit (the reference's)
UPSAMPLE_MODES = ("torch", "pil")
INPUT_SIZE_RULES = ("native", "fail")  # dissect.input_size.decide_input_size
TOP_IMAGE_TIEBREAKS = ("area", "index")  # peak ties: larger above-threshold area first, or smaller index
# argparse group titles of `dissect run --help`, in order
FLAG_GROUPS = {"model": "model", "method": "method (defaults: NetDissect-Lite)", "groups": "concept groups",
               "execution": "execution (no effect on results)", "data": "data"}


@dataclass
class DissectConfig(Options):
    """Options of one dissection run (defaults reproduce NetDissect-Lite)."""

    top_fraction: float = option(
        0.005, "top fraction of activations above the threshold: T_k = quantile at level 1 - this of all "
        "N*h*w values", flag="--quantile", aliases=("--top-fraction",), low=0.0, high=1.0, open_bounds=True,
        expected="a fraction in (0, 1), e.g. 0.005", results=True, group="method")
    interpolation: str = option(
        "hazen", "quantile interpolation (numpy names; hazen = type 5, the reference's)",
        choices=INTERPOLATIONS, results=True, group="method")
    union: str = option(
        "lite", "IoU union: lite (category counted where its labels lie under the mask) or original "
        "(anywhere in the image)", choices=UNIONS, results=True, group="method")
    iou_threshold: float = option(
        0.04, "detector IoU threshold: a unit is a detector when its top label's IoU passes it",
        low=0.0, high=1.0, results=True, group="method")
    detector_rule: str = option(
        ">=", "'>=' as Lite's report or '>' as the paper's scripts", choices=DETECTOR_RULES, results=True,
        group="method")
    unique_rule: str = option(
        ">", "rule of the 'paper' unique-detector count (its scripts use '>')", choices=DETECTOR_RULES,
        results=True, group="method")
    categories: list[str] | None = option(
        None, "categories to label with, space- or comma-separated (default: every category of the dataset)",
        metavar="CAT", results=True, group="method")
    split: str | None = option(
        None, "only this split of index.csv (default: all images, as the reference)",
        choices=(None, "train", "val"), expected="'train', 'val' or None", results=True, group="method")
    limit: int | None = option(
        None, "only the first N images (quick looks)", metavar="N", low=1,
        expected="a positive integer or None", results=True, group="method")
    images: str = option(
        "annotated", "which images to dissect: annotated (those with data in a selected category, as "
        "NetDissect-Lite keeps them) or all", choices=IMAGE_RULES, results=True, group="method")
    upsample: str = option(
        "torch", "mask upsampling arithmetic: torch (F.interpolate, float32 compare) or pil (Pillow's "
        "BILINEAR bit for bit, compared in float64, as NetDissect-Lite's imresize)", choices=UPSAMPLE_MODES,
        results=True, group="method")
    thresholds: list[str] = option(
        [], "tally at these per-unit thresholds instead of computing them: LAYER=FILE, a .npy of shape "
        "(units,) such as NetDissect-Lite's quantile.npy (repeatable; a plain FILE when one layer is "
        "dissected)", metavar="LAYER=FILE", append=True, results=True, group="method")
    top_k: int = option(10, "top images kept per unit for reports (highest spatial-max activation)",
                        low=1, results=True, group="method")
    top_images_tiebreak: str = option(
        "area", "order of top images tied at the peak activation: area (larger above-threshold mask first, "
        "then smaller index) or index (smaller image index, the order before this option)",
        choices=TOP_IMAGE_TIEBREAKS, results=True, group="method")
    label_strips: str = option(
        "on", "also keep, per unit, the top_k images with the largest intersection of its mask with its "
        "top label (one more pass over the images)", choices=("on", "off"), results=True, group="method")
    tf32: str = option(
        "off", "CUDA only: TF32 convolutions and matmuls in the model's forward (faster on Ampere and later; "
        "activations, hence thresholds and masks, move away from float32's); off: IEEE float32",
        choices=("on", "off"), results=True, group="method")
    batch_size: int = option(64, "images per forward pass", low=1, group="execution")
    seed: int = option(0, "random seed (torch/numpy; the engine itself is deterministic)", results=True,
                       group="method")
    device: str = option("auto", "auto (cuda when present), cpu, cuda, cuda:N", group="execution")
    keep_activations: str = option(
        "auto", "keep stage-1 activations for stages 2 and 3 (auto: when under --activation-budget-mb)",
        choices=KEEP_ACTIVATIONS, group="execution")
    activation_budget_mb: int | None = option(
        None, "memory for kept activations, MiB (default: half the memory free when the run starts, "
        "MemAvailable on CPU or the GPU's free memory, shared by a machine's torchrun processes; 2048 where "
        "unknown; the log says the value)", metavar="MIB", low=0,
        expected="a non-negative integer or None", group="execution")
    threads: int = option(
        0, "torch intra-op CPU threads during the run (0: auto, the cores this process may use, "
        "os.sched_getaffinity, that other processes leave idle when it starts; fewer on a GPU)", metavar="N",
        low=0, group="execution")
    loader_threads: int = option(
        0, "threads that decode or read batches ahead of compute, in order (0: auto, one per 4 cores on "
        "CPU, up to 8 on a GPU); any count gives the same results", metavar="N", low=0, group="execution")
    normalize: str | None = option(
        None, "input normalisation (default: the checkpoint's, else imagenet); given explicitly it wins over "
        "the checkpoint's (with a warning) and summary.json records what was used", choices=(None, *NORMALIZE_NAMES),
        results=True, group="model")
    input_size: int | None = option(
        None, "resize images to N x N before the model (bilinear, antialiased), e.g. 32 for CIFAR nets; "
        "default: as stored", metavar="N", low=1, expected="a positive integer or None", results=True,
        group="model")
    # not a result field: its effect is the input_size the run records (and keys on); "fail" changes nothing
    input_size_rule: str = option(
        "native", "when the model's native input size is known (checkpoint, --weights, timm config), "
        "--input-size is not given and the images differ from it by more than 2x: native (resize to the "
        "model's size and say so) or fail (exit 2 asking for --input-size); summary.json records the decision",
        choices=INPUT_SIZE_RULES, group="model")
    layers: list[str] | None = option(
        None, "dotted module names, space- or comma-separated (default: the checkpoint's grouped layers, else "
        "every Conv2d); `dissect layers MODEL` lists them", metavar="NAME", results=True, group="model")
    groups: int | None = option(
        None, "G equal contiguous groups per layer (default: the checkpoint's groups, if any)", metavar="G",
        low=1, expected="a positive integer or None", results=True, group="groups")
    group_alpha: float = option(
        0.5, "weight of the detector fraction in the aligned-concept score (alpha*detector fraction + "
        "(1-alpha)*mean IoU)", low=0.0, high=1.0, results=True, group="groups")
    group_threshold: float = option(
        0.3, "score a group needs to be aligned to a concept", low=0.0, high=1.0,
        expected="a number in [0, 1] (the score mixes a detector fraction and a mean IoU)", results=True,
        group="groups")
    mask_connectivity: int = option(
        2, "connectivity of the connected components counted in each unit's top-image masks: 1 "
        "(4-neighbour) or 2 (8-neighbour)", choices=(1, 2), results=True, group="method")
    save_every: int = option(50, "batches between saved states for resuming", low=1, group="execution")
    save_interval_s: float = option(
        60.0, "and at least this many seconds between saves (0: every time)", flag="--save-interval",
        low=0.0, expected="a non-negative number of seconds", group="execution")

    def _check(self, source: str | None) -> None:
        threshold_specs(self.thresholds)  # LAYER=FILE syntax, before any work

    def result_key(self) -> str:
        """Hash of the options that change results (device, batch size and bookkeeping excluded).

        Given threshold files enter by content: another file at the same path is another result.
        """
        d = {k: v for k, v in self.to_dict().items() if k in RESULT_FIELDS}
        if self.thresholds:
            d["thresholds_sha256"] = [
                file_sha256(path, f"--thresholds {layer}={path}" if layer else f"--thresholds {path}",
                            "expected a .npy array of shape (units,): one threshold per unit of the layer")
                for layer, path in threshold_specs(self.thresholds)]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Options whose value can change a number in the outputs: they key caches and resumed states.
RESULT_FIELDS = DissectConfig.result_fields()
# Field -> the `dissect run` flag that sets it, so errors name what the user typed.
OPTION_FLAGS = DissectConfig.flags()


ARCH_HELP = ("architecture of a state_dict or TorchScript archive: a torchvision classification model or a "
             "cgl_train model. A bare name is looked up in torchvision first, then cgl_train; prefix it to "
             "pick the registry: 'torchvision:alexnet' or 'cgl:alexnet'; 'timm:NAME' for a timm model "
             "(a checkpoint of timm's train.py; needs the [timm] extra)")
DECODED_CACHE = ("auto", "build", "off")
FINGERPRINTS = ("stat", "content")  # broden.cache.FINGERPRINT_MODES


@dataclass
class LoadOptions(Options):
    """How to read a model file (`dissect run`, `dissect layers`); none changes a number once it loads."""

    arch: str | None = option(None, ARCH_HELP, metavar="NAME", group="model")
    weights: str | None = option(
        None, "torchvision's pretrained weights of --arch (e.g. IMAGENET1K_V1, DEFAULT), read offline from "
        "$TORCH_HOME/hub/checkpoints (never downloaded); then MODEL is left out or 'torchvision:NAME'. Their "
        "normalisation and crop size are the defaults of --normalize and --input-size",
        metavar="NAME", group="model")
    num_classes: int | None = option(
        None, "outputs of a state_dict's classifier (default: inferred from the weights)", metavar="N", low=1,
        expected="a positive integer or None", group="model")
    trust_pickle: bool = option(
        False, "allow loading a whole pickled module (runs code from the file: only for files you trust)",
        group="model")


@dataclass
class RunSettings(Options):
    """Where data comes from and what to do with an earlier run: no effect on the numbers."""

    cache_dir: str | None = option(
        None, "where named datasets, synthetic sets and decoded caches live (default $DISSECT_CACHE_DIR or "
        "~/.cache/concept-dissect)", metavar="DIR", group="data")
    download: bool = option(False, "fetch a named dataset when it is not in the cache dir", group="data")
    mirrors: list[str] = option([], "extra base URL for --download (repeatable)", flag="--mirror",
                                metavar="URL", append=True, group="data")
    decoded_cache: str = option(
        "auto", "decoded image cache: auto (read it if present, else write it while the first pass decodes, "
        "when that pass reads every image of the dataset on one process; torchrun: rank 0 builds it first), "
        "build (build it first, in parallel threads), off (decode on every pass)", choices=DECODED_CACHE,
        group="data")
    allow_outside_links: bool = option(
        False, "follow symbolic links in the dataset's images/ that resolve outside it (refused by default: "
        "the dataset would read files it does not contain)", group="data")
    fingerprint: str = option(
        "stat", "how a dataset is recognised (keys the decoded cache and reused runs): stat (size + mtime of "
        "every file: fast on the 63k images of Broden) or content (sha256 of every file, hashed in parallel: "
        "catches edits that keep size and mtime)", choices=FINGERPRINTS, group="data")
    synthetic_per_class: int | None = option(
        None, "--dataset synthetic: images per class (default: the checkpoint's training set when it was "
        "trained on synthetic data, else the paper's 640)", metavar="N", low=1,
        expected="a positive integer or None", group="data")
    synthetic_size: int | None = option(
        None, "--dataset synthetic: image size (default: the checkpoint's training set, else 64)",
        metavar="PX", low=1, expected="a positive integer or None", group="data")
    force: bool = option(False, "recompute even if DIR holds a finished identical run, and rebuild the decoded "
                         "cache from the image files", group="execution")
    quiet: bool = option(False, "no progress bars", group="execution")


def threshold_specs(values: list[str]) -> list[tuple[str | None, str]]:
    """--thresholds entries as (layer or None for a plain FILE, file path); module names hold no '='."""
    specs = []
    for text in values:
        layer, sep, path = text.partition("=")
        if not sep:
            layer, path = "", text
        if not path or (sep and not layer):
            raise InputError(f"--thresholds {text!r}: expected LAYER=FILE (or a plain FILE when one layer "
                             f"is dissected), e.g. conv5=quantile.npy")
        specs.append((layer or None, path))
    return specs


def file_sha256(path: str | Path, shown: str, expected: str = "") -> str:
    """sha256 of a file's bytes; an InputError starting with `shown` (what the user typed) when unreadable."""
    h = hashlib.sha256()
    hint = f"; {expected}" if expected else ""
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file{hint}") from None
    except OSError as e:
        raise InputError(f"{shown}: cannot read the file ({e.strerror or e}){hint}") from None
    return h.hexdigest()


def passes_rule(value: Any, threshold: float, rule: str) -> Any:
    """`value >= threshold` or `value > threshold` by rule name; works on floats, arrays, tensors."""
    if rule == ">=":
        return value >= threshold
    if rule == ">":
        return value > threshold
    raise InputError(f"detector rule {rule!r}: expected one of {', '.join(DETECTOR_RULES)}")
