"""Load a model to dissect from any of the forms users have, safely.

Forms: a cgl_train checkpoint, a bare state_dict (+ an architecture name), a
training script's checkpoint dict that names its architecture (NetDissect-Lite's
and MIT's Places365 zoo, torchvision's and timm's train.py: `arch_named_in`), a
TorchScript archive, or a whole pickled module (only when the user says they
trust the file, because unpickling runs arbitrary code). Without a file:
torchvision's pretrained weights from the local hub cache (dissect.pretrained,
`load_requested`). `--arch timm:NAME` builds timm's model (dissect.timm_models).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from broden.download import sha256_file
from broden.errors import InputError
from dissect.checkpoint import CheckpointError, is_checkpoint, validate_checkpoint

__all__ = ["NORMALIZATIONS", "DEFAULT_NORMALIZATION", "LoadedModel", "load_model", "model_from_module",
           "conv_layer_names", "default_layers", "module_type_name", "known_arches",
           "resolve_normalization", "parse_arch", "ARCH_PREFIXES", "arch_named_in", "WEIGHT_KEYS",
           "load_requested", "is_arch_spec"]

log = logging.getLogger(__name__)

# mean/std per RGB channel on the 0..1 scale: x = (img / 255 - mean) / std.
NORMALIZATIONS: dict[str, dict[str, list[float]]] = {
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    # NetDissect-Lite (feature_operation.py) subtracts its mean pixel (124.6901, 118.6897, 109.5388)
    # on the 0..255 scale and divides by 255 * 0.224; dissect.preprocess keeps its arithmetic.
    "lite": {"mean": [124.6901 / 255, 118.6897 / 255, 109.5388 / 255], "std": [0.224, 0.224, 0.224]},
    "none": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
}
DEFAULT_NORMALIZATION = "imagenet"

KINDS = ("checkpoint", "state_dict", "torchscript", "pickle", "module", "pretrained")


@dataclass
class LoadedModel:
    """A model ready to dissect, with everything about its origin that results must record."""
    module: nn.Module                    # eval mode
    kind: str                            # one of KINDS
    source: str                          # file path, or "<memory>"
    arch: str | None                     # registry name when known
    fingerprint: str                     # sha256 of the file bytes (or of the state_dict tensors)
    normalization: dict[str, list[float]]
    input_size: int | None
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    native_input_size: int | None = None   # the size the model was made for, when known (weights, checkpoint, timm)
    weights: dict[str, Any] | None = None  # torchvision pretrained weights: name, file, sha256, url, transforms
    # where normalisation and input size came from: '--normalize'/'--input-size', 'checkpoint', 'weights',
    # 'timm config', 'default' (normalisation) or None (input size: the images' own)
    origins: dict[str, str | None] = field(default_factory=dict)
    input_size_decision: dict[str, Any] | None = None  # dissect.input_size.decide_input_size's record

    def describe(self) -> dict[str, Any]:
        """The `model` block of summary.json (docs/contracts.md)."""
        ckpt = self.checkpoint or {}
        return {"source": self.source, "kind": self.kind, "arch": self.arch,
                "fingerprint": self.fingerprint, "metrics": self.metrics,
                "normalization": self.normalization, "input_size": self.input_size,
                # the training seed and epochs a checkpoint records: runs of one configuration differ by it
                "train_seed": ckpt.get("seed"), "train_epoch": ckpt.get("epoch"),
                "weights": self.weights,
                "preprocessing": {"normalization_from": self.origins.get("normalization", "default"),
                                  "input_size_from": self.origins.get("input_size"),
                                  "native_input_size": self.native_input_size,
                                  "input_size_decision": self.input_size_decision}}


# ---------------------------------------------------------------- normalisation and sizes

def resolve_normalization(normalize: str | Mapping[str, Any] | None,
                          default: str = DEFAULT_NORMALIZATION) -> dict[str, list[float]]:
    """Turn a name from NORMALIZATIONS (or a {"mean", "std"} dict) into a mean/std dict."""
    if normalize is None:
        normalize = default
    if isinstance(normalize, str):
        if normalize not in NORMALIZATIONS:
            raise InputError(f"--normalize: unknown normalisation {normalize!r}; "
                             f"valid: {', '.join(NORMALIZATIONS)}")
        spec = NORMALIZATIONS[normalize]
    else:
        spec = normalize
    try:
        mean = [float(x) for x in spec["mean"]]
        std = [float(x) for x in spec["std"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"normalization: expected a name ({', '.join(NORMALIZATIONS)}) or a dict "
                         f"with 'mean' and 'std' lists of 3 numbers, got {normalize!r}") from e
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise InputError(f"normalization: 'mean' and 'std' need 3 values each and std > 0, got {normalize!r}")
    return {"mean": mean, "std": std}


def _check_input_size(input_size: int | None, what: str = "--input-size") -> int | None:
    if input_size is None:
        return None
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise InputError(f"{what}: expected a positive integer (pixels), got {input_size!r}")
    return input_size


# ---------------------------------------------------------------- architectures

def _cgl_models() -> dict[str, Any]:
    """The checkpoint architectures (dissect.architectures.MODELS; imported late: it loads torchvision)."""
    from dissect.architectures import MODELS
    return dict(MODELS)


def _torchvision_classifiers() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_arches() -> dict[str, list[str]]:
    """Architecture names `--arch` accepts, by source."""
    return {"cgl_train": sorted(_cgl_models()), "torchvision": _torchvision_classifiers()}


def _build_cgl(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    from dissect.architectures import build_model
    return build_model(arch, **kwargs)


def _build_tv(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    import torchvision
    return torchvision.models.get_model(arch, weights=None, **kwargs)


# --arch prefixes that pin the registry (a bare name is looked up in the preferred registry first).
ARCH_PREFIXES = {"torchvision": "torchvision", "tv": "torchvision", "cgl": "cgl_train", "cgl_train": "cgl_train",
                 "timm": "timm"}


def parse_arch(arch: str) -> tuple[str, str | None]:
    """Split 'torchvision:alexnet' / 'cgl:alexnet' / 'timm:resnet50' into (name, registry); a bare name gives
    (name, None)."""
    prefix, sep, name = arch.partition(":")
    if not sep:
        return arch, None
    if prefix not in ARCH_PREFIXES or not name:
        raise InputError(f"--arch {arch}: expected NAME, torchvision:NAME, cgl:NAME or timm:NAME")
    return name, ARCH_PREFIXES[prefix]


def _build_arch(arch: str, kwargs: Mapping[str, Any], source: str,
                prefer: str = "cgl_train", named_by: str | None = None) -> nn.Module:
    """Build `arch` (weights=None: no downloads) from dissect.architectures or torchvision, `prefer` first.

    Checkpoints prefer cgl_train (they name its registry); bare state_dicts prefer torchvision,
    whose names users pass with --arch (cgl_train's 'alexnet' differs only in out-of-place ReLUs).
    A 'torchvision:' or 'cgl:' prefix on `arch` uses that registry only.
    """
    arch, pinned = parse_arch(arch)
    if pinned == "timm":  # only by name: timm is an optional extra, never searched for a bare name
        from dissect.timm_models import build_timm

        return build_timm(arch, kwargs, source)
    builders = {"cgl_train": (_cgl_models(), _build_cgl), "torchvision": (_torchvision_classifiers(), _build_tv)}
    order = [pinned] if pinned else [prefer] + [k for k in builders if k != prefer]
    for label in order:
        names, build = builders[label]
        if arch in names:
            try:
                return build(arch, kwargs)
            except InputError as e:  # cgl_train's own checks, which do not know the file
                raise InputError(f"{source}: {e}") from e
            except (TypeError, ValueError) as e:  # a constructor argument the architecture does not take
                raise InputError(f"{source}: cannot build {label} architecture {arch!r} with arguments "
                                 f"{dict(kwargs)!r}: {e}") from e
    names = known_arches()
    where = f" in {pinned}" if pinned else ""
    valid = (f"valid --arch names: cgl_train: {', '.join(names['cgl_train']) or '(none)'}; "
             f"torchvision: {', '.join(names['torchvision'])}")
    if named_by is not None:
        raise InputError(f"{source}: the file names architecture {arch!r} (its {named_by}), which neither "
                         f"torchvision nor cgl_train knows; pass --arch NAME for the architecture the weights "
                         f"fit, or build the module in Python and call dissect.run(module, ...); {valid}")
    raise InputError(f"{source}: unknown architecture {arch!r}{where}; {valid}")


def _load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    """load_state_dict(strict) with a message that says which keys disagree and what to try."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatch (file vs model)", wrong_shape)):
            if keys:
                more = f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label}: {', '.join(keys[:8])}{more}")
        raise InputError(f"{source}: the weights do not fit architecture {arch!r} ({'; '.join(parts)}); "
                         f"check --arch (and --num-classes, for a state_dict)")
    module.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------- state_dict helpers

def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


# Where training scripts put the weights: NetDissect-Lite's zoo, MIT's Places365 and timm use
# 'state_dict', torchvision's references/classification/train.py 'model', others 'net'.
WEIGHT_KEYS = ("state_dict", "model", "net")
# Where they name the architecture: 'arch' (Lite's zoo, Places365, timm), 'model' when it is a
# string, else the argparse arguments they saved (torchvision's train.py: args.model).
ARCH_KEYS = ("arch", "model")
ARGS_ARCH_KEYS = ("arch", "model")


def _unwrap_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The state_dict in `obj`: obj itself, or obj[key] for key in WEIGHT_KEYS (training scripts)."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in WEIGHT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def arch_named_in(obj: Any) -> tuple[str | None, str | None]:
    """(architecture name, where it was found) of a training script's checkpoint dict; (None, None) if none."""
    if not isinstance(obj, Mapping):
        return None, None
    for key in ARCH_KEYS:
        if isinstance(obj.get(key), str) and obj[key]:
            return obj[key], f"key {key!r}"
    args = obj.get("args")
    fields = vars(args) if isinstance(args, argparse.Namespace) else args
    if isinstance(fields, Mapping):
        for key in ARGS_ARCH_KEYS:
            if isinstance(fields.get(key), str) and fields[key]:
                return fields[key], f"args.{key}"
    return None, None


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop DataParallel/DDP's `module.` prefix, but only when every key has it (a model may own a 'module')."""
    sd = dict(state_dict)
    while sd and all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


_MODULE_SEGMENT = re.compile(r"(^|\.)module\.")


def _fit_keys(state_dict: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state_dict, or its keys without inner `module.` segments when only that makes them fit.

    MIT's Places365 AlexNet/VGG wrapped `features` alone in DataParallel (`features.module.0.weight`);
    the segments go only when the result names exactly the model's keys (a model may own a 'module').
    """
    if set(state_dict) == set(expected):
        return state_dict
    stripped = {_MODULE_SEGMENT.sub(r"\1", k): v for k, v in state_dict.items()}
    return stripped if set(stripped) == set(expected) else state_dict


def _infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Output count of the last weight matrix (a Linear, or a 1x1 conv classifier as in SqueezeNet)."""
    for key in reversed(list(state_dict)):
        value = state_dict[key]
        if key.endswith("weight") and value.ndim >= 2:
            return int(value.shape[0])
    return None


# ---------------------------------------------------------------- fingerprints

def _state_dict_sha256(module: nn.Module) -> str:
    """Hash of names, dtypes, shapes and bytes of every tensor in the state_dict (sorted by name)."""
    h = hashlib.sha256()
    sd = module.state_dict()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # viewing as bytes works for every dtype, bfloat16 included (numpy has no bfloat16); the
        # array is hashed through its buffer, not copied out first (tobytes: a 244 MB copy for AlexNet)
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------- loading

def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with code/ and constants.pkl (torch.save zips have neither)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True; explain a refusal; weights_only=False only when trusted."""
    try:
        # torchvision's and timm's train.py save their argparse arguments; a Namespace only holds
        # attributes (unpickling it sets its __dict__, no code runs), so it is allowed with the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not trust_pickle:
            if match:
                raise InputError(
                    f"{path}: the file holds a pickled class ({match.group(1)}), not only weights. "
                    f"Unpickling it runs arbitrary code from the file, so it is refused by default. "
                    f"Pass --trust-pickle (trust_pickle=True) to load it anyway, only for files you trust; "
                    f"better, save model.state_dict() and pass --arch.") from e
            raise InputError(f"{path}: cannot be read as a torch file (weights only): {e}") from e
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        if not trust_pickle:
            raise InputError(f"{path}: cannot be read as a torch checkpoint, state_dict, TorchScript "
                             f"archive or pickled module: {e}") from e
    log.warning("%s: loading with weights_only=False (--trust-pickle): this runs code from the file", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a torch file even with --trust-pickle: {e}") from e


def _directory_message(path: Path) -> str:
    """Say that `path` is a directory, what is expected instead, and the model files it holds if any."""
    found = [path / name for name in ("best.pth", "latest.pth") if (path / name).is_file()]
    hint = (f"; it holds {' and '.join(map(str, found))} (a cgl-train run directory): pass one of those"
            if found else "")
    return (f"{path}: is a directory; expected a model file (a checkpoint, state_dict, TorchScript archive or "
            f"pickled module){hint}")


def load_model(path: str | Path, arch: str | None = None, trust_pickle: bool = False,
               normalize: str | None = None, input_size: int | None = None,
               num_classes: int | None = None, allow_script: bool = False) -> LoadedModel:
    """Load a checkpoint, state_dict (+ arch), TorchScript archive (+ arch) or (trusted) pickled module, on CPU.

    See `_load_file`; the LoadedModel's `origins` say where its normalisation and input size came from.
    """
    loaded = _load_file(path, arch, trust_pickle, normalize, input_size, num_classes, allow_script)
    if not loaded.origins:  # the forms that carry no preprocessing of their own
        loaded.origins = {"normalization": "--normalize" if normalize is not None else "default",
                          "input_size": "--input-size" if input_size is not None else None}
    return loaded


def _load_file(path: str | Path, arch: str | None, trust_pickle: bool, normalize: str | None,
               input_size: int | None, num_classes: int | None, allow_script: bool) -> LoadedModel:
    """Load a checkpoint, state_dict (+ arch), TorchScript archive (+ arch) or (trusted) pickled module, on CPU.

    A dict holding a state_dict (under 'state_dict', 'model' or 'net') that names its
    architecture ('arch', a string 'model', or args.model of a saved argparse Namespace)
    needs no `arch`; a given `arch` overrides the file's name (logged). `module.` prefixes
    are stripped and num_classes is inferred from the weights.

    Normalisation: an explicit `normalize` wins (a warning when it differs from a checkpoint's),
    else the checkpoint's, else 'imagenet'. `input_size` overrides the checkpoint's input size.
    TorchScript modules refuse forward hooks, so an archive needs `arch`: its state_dict() is
    loaded into that eager model. Without `arch` it is an InputError, unless `allow_script`
    (listing layer names only), which returns the scripted module itself.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise InputError(_directory_message(path))
    if not path.is_file():
        raise InputError(f"{path}: no such model file (expected a checkpoint, state_dict, "
                         f"TorchScript archive or pickled module)")
    input_size = _check_input_size(input_size)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
        raise InputError(f"--num-classes: expected a positive integer, got {num_classes!r}")
    fingerprint = sha256_file(path)

    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                # torch.jit.load's deprecation notice is not actionable for someone dissecting a file
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise InputError(f"{path}: looks like a TorchScript archive but torch.jit.load failed: {e}") from e
        if arch is None:
            if allow_script:
                return _finish(module, "torchscript", source, None, fingerprint,
                               resolve_normalization(normalize), input_size)
            raise InputError(f"{path}: is a TorchScript archive; TorchScript modules do not support the "
                             f"forward hooks dissection needs. Pass --arch NAME (the torchvision or "
                             f"cgl_train architecture it was scripted from): its weights are loaded into "
                             f"the eager model, which is dissected")
        eager = _eager_from_state_dict(module.state_dict(), arch, num_classes, source)
        return _finish(eager, "torchscript", source, arch, fingerprint, resolve_normalization(normalize),
                       input_size)

    obj = _torch_load(path, trust_pickle)
    if is_checkpoint(obj):
        try:
            ckpt = validate_checkpoint(obj, path)
        except CheckpointError as e:
            raise InputError(str(e)) from e
        return _from_checkpoint(ckpt, path, arch, normalize, input_size, fingerprint)

    if isinstance(obj, nn.Module):  # only reachable with trust_pickle
        return _finish(obj, "pickle", source, arch, fingerprint, resolve_normalization(normalize), input_size)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        return _finish(obj["model"], "pickle", source, arch, fingerprint,
                       resolve_normalization(normalize), input_size)

    state_dict = _unwrap_state_dict(obj)
    if state_dict is None:
        keys = f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else ""
        raise InputError(f"{path}: holds a {type(obj).__name__}{keys}; expected a cgl checkpoint, a state_dict "
                         f"(name -> tensor, possibly under {', '.join(map(repr, WEIGHT_KEYS))}), a TorchScript "
                         f"archive or a pickled nn.Module")
    named, where = arch_named_in(obj)
    named_by = None
    if arch is None:
        if named is None:
            keys = (f" (its keys: {', '.join(sorted(map(str, obj)))})" if state_dict is not obj else "")
            raise InputError(f"{path}: holds a state_dict{keys} but no architecture name (no "
                             f"{' or '.join(map(repr, ARCH_KEYS))} key, no args.model); pass --arch NAME (a "
                             f"torchvision classification model such as resnet18, or a cgl_train model; "
                             f"`dissect layers` lists the layers once it loads)")
        arch, named_by = named, where
        log.info("%s: architecture %r, from the file's %s", path, arch, where)
    elif named is not None and parse_arch(arch)[0] != named:
        log.info("%s: --arch %s overrides the architecture the file names (%r, its %s)", path, arch, named, where)
    file_classes = obj.get("num_classes") if isinstance(obj, Mapping) else None
    if num_classes is None and _infer_num_classes(state_dict) is None and isinstance(file_classes, int):
        num_classes = file_classes  # Lite's zoo records it; used only when the weights do not say
    module = _eager_from_state_dict(state_dict, arch, num_classes, source, named_by=named_by)
    if parse_arch(arch)[1] == "timm":
        from dissect.timm_models import timm_preprocessing

        # the model's own config (and the training run's arguments) say its mean/std and input size
        own_norm, native, origin = timm_preprocessing(module, obj)
        size = input_size if input_size is not None else native
        return _finish(module, "state_dict", source, arch, fingerprint,
                       resolve_normalization(normalize if normalize is not None else own_norm), size,
                       native_input_size=native,
                       origins={"normalization": "--normalize" if normalize is not None else origin,
                                "input_size": "--input-size" if input_size is not None else
                                (origin if native is not None else None)})
    return _finish(module, "state_dict", source, arch, fingerprint, resolve_normalization(normalize), input_size)


def _eager_from_state_dict(state_dict: Mapping[str, torch.Tensor], arch: str, num_classes: int | None,
                           source: str, named_by: str | None = None) -> nn.Module:
    """Build `arch` (torchvision first, unless prefixed) with num_classes from the weights; load them strictly."""
    state_dict = _strip_prefix(state_dict)
    inferred = _infer_num_classes(state_dict)
    if num_classes is not None and inferred is not None and num_classes != inferred:
        raise InputError(f"--num-classes {num_classes}: the weights in {source} have {inferred} outputs")
    n = num_classes if num_classes is not None else inferred
    module = _build_arch(arch, {"num_classes": n} if n is not None else {}, source, prefer="torchvision",
                         named_by=named_by)
    _load_weights(module, _fit_keys(state_dict, module.state_dict()), arch, source)
    return module


def _from_checkpoint(ckpt: dict[str, Any], path: Path, arch: str | None, normalize: str | None,
                     input_size: int | None, fingerprint: str) -> LoadedModel:
    if arch is not None and parse_arch(arch)[0] != ckpt["arch"]:
        raise InputError(f"--arch {arch}: {path} is a checkpoint of architecture {ckpt['arch']!r}; "
                         f"leave --arch out for checkpoints")
    norm = resolve_normalization(ckpt["normalization"])
    if normalize is not None:
        chosen = resolve_normalization(normalize)
        if chosen != norm:
            # an explicit flag is a deliberate choice (e.g. probing a mismatch): it wins, loudly;
            # summary.json records the normalisation actually applied
            log.warning("%s: --normalize %s overrides the checkpoint's normalisation (trained with "
                        "mean=%s std=%s)", path, normalize, norm["mean"], norm["std"])
        norm = chosen
    module = _build_arch(ckpt["arch"], ckpt["arch_kwargs"], str(path))
    _load_weights(module, ckpt["state_dict"], ckpt["arch"], str(path))
    size = input_size if input_size is not None else _check_input_size(ckpt["input_size"], f"{path}: input_size")
    groups = {layer: {k: int(v) for k, v in cfg.items()} for layer, cfg in ckpt["groups"].items()}
    unknown = [name for name in groups if name not in dict(module.named_modules())]
    if unknown:
        raise InputError(f"{path}: field 'groups' names layers the model does not have: {', '.join(unknown)}")
    metrics = dict(ckpt["metrics"]) if ckpt.get("metrics") else None
    native = _check_input_size(ckpt["input_size"], f"{path}: input_size")
    return _finish(module, "checkpoint", str(path), ckpt["arch"], fingerprint, norm, size,
                   groups=groups, metrics=metrics, checkpoint=ckpt, native_input_size=native,
                   origins={"normalization": "--normalize" if normalize is not None else "checkpoint",
                            "input_size": "--input-size" if input_size is not None else
                            ("checkpoint" if native is not None else None)})


def _finish(module: nn.Module, kind: str, source: str, arch: str | None, fingerprint: str,
            normalization: dict[str, list[float]], input_size: int | None, **extra: Any) -> LoadedModel:
    module.eval()
    log.info("loaded %s (%s%s), normalisation mean=%s std=%s", source, kind,
             f", arch {arch}" if arch else "", normalization["mean"], normalization["std"])
    return LoadedModel(module=module, kind=kind, source=source, arch=arch, fingerprint=fingerprint,
                       normalization=normalization, input_size=input_size, **extra)


def model_from_module(module: nn.Module, normalization: str | Mapping[str, Any] | None = None,
                      input_size: int | None = None,
                      groups: Mapping[str, Mapping[str, int]] | None = None) -> LoadedModel:
    """Wrap an in-memory module for the Python API (put in eval mode; left on its device)."""
    if not isinstance(module, nn.Module):
        raise InputError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    names = dict(module.named_modules())
    groups = {layer: dict(cfg) for layer, cfg in (groups or {}).items()}
    unknown = [layer for layer in groups if layer not in names]
    if unknown:
        raise InputError(f"groups: layers not in the module: {', '.join(unknown)}")
    return _finish(module, "module", "<memory>", None, _state_dict_sha256(module),
                   resolve_normalization(normalization), _check_input_size(input_size, "input_size"),
                   groups=groups,
                   origins={"normalization": "--normalize" if normalization is not None else "default",
                            "input_size": "--input-size" if input_size is not None else None})


def is_arch_spec(model: Any) -> bool:
    """Whether a MODEL argument names an architecture ('torchvision:resnet18') rather than a file."""
    if not isinstance(model, str) or Path(model).exists():
        return False
    prefix, sep, name = model.partition(":")
    return bool(sep and name) and ARCH_PREFIXES.get(prefix) == "torchvision"


def load_requested(model: str | Path | None, arch: str | None = None, weights: str | None = None,
                   trust_pickle: bool = False, normalize: str | None = None, input_size: int | None = None,
                   num_classes: int | None = None, allow_script: bool = False) -> LoadedModel:
    """What MODEL and --arch/--weights ask for: a model file (`load_model`), or torchvision's pretrained
    `weights` of `arch` read offline from the torch hub cache (dissect.pretrained), MODEL then None or
    'torchvision:NAME'."""
    if is_arch_spec(model):
        named = parse_arch(str(model))[0]
        if arch is not None and parse_arch(arch)[0] != named:
            raise InputError(f"MODEL {model} and --arch {arch} name different architectures; give one")
        if weights is None:
            raise InputError(f"MODEL {model}: names an architecture, not a file; add --weights NAME for "
                             f"torchvision's pretrained weights (e.g. --weights DEFAULT), or pass a weights file "
                             f"as MODEL with --arch {named}")
        arch, model = f"torchvision:{named}", None
    if weights is None:
        if model is None:
            raise InputError("MODEL: missing; pass a model file (checkpoint, state_dict, TorchScript archive, "
                             "pickled module), or --arch NAME --weights NAME for torchvision's pretrained weights")
        return load_model(model, arch=arch, trust_pickle=trust_pickle, normalize=normalize,
                          input_size=input_size, num_classes=num_classes, allow_script=allow_script)
    if model is not None:
        raise InputError(f"--weights {weights}: names torchvision's pretrained weights, read from the torch hub "
                         f"cache, so it takes no MODEL file ({model}); drop MODEL, or drop --weights to load "
                         f"the file")
    if arch is None:
        raise InputError(f"--weights {weights}: needs --arch NAME (the torchvision model, e.g. --arch resnet18)")
    name, registry = parse_arch(arch)
    if registry not in (None, "torchvision"):
        raise InputError(f"--arch {arch} --weights {weights}: --weights names torchvision's pretrained weights "
                         f"only; for a {registry} model pass its weights file as MODEL")
    if num_classes is not None:
        raise InputError(f"--num-classes {num_classes}: torchvision's weights {weights} fix the classifier; "
                         f"leave --num-classes out")
    return _load_pretrained(name, weights, normalize=normalize, input_size=_check_input_size(input_size))


def _load_pretrained(arch: str, weights: str, normalize: str | None = None,
                    input_size: int | None = None) -> Any:
    """A LoadedModel of torchvision's `arch` with its pretrained `weights`, read offline from the hub cache.

    Normalisation and input size default to the weights' (mean/std and crop size of
    `weights.transforms()`); an explicit `normalize` / `input_size` wins, and the model's
    `preprocessing` record says which came from where. No download is ever attempted.
    """
    from dissect.pretrained import (constructor_kwargs, read_verified, renamed_keys, resolve_weights,
                                    weights_file, weights_transforms)

    entry = resolve_weights(arch, weights)
    path = weights_file(entry)
    state_dict, digest = read_verified(path, entry, arch)
    module: nn.Module = _build_arch(f"torchvision:{arch}", constructor_kwargs(arch, entry), str(path))
    _load_weights(module, renamed_keys(arch, state_dict), arch, str(path))
    module.eval()

    transforms = weights_transforms(entry)
    own_norm = {"mean": transforms["mean"], "std": transforms["std"]}
    crop = transforms["crop_size"]
    native = int(crop[0]) if crop else None
    norm = resolve_normalization(normalize if normalize is not None else own_norm)
    size = _check_input_size(input_size)
    log.info("loaded torchvision %s with weights %r from %s", arch, entry, path)
    return LoadedModel(
        module=module, kind="pretrained", source=str(path), arch=f"torchvision:{arch}", fingerprint=digest,
        normalization=norm, input_size=size if size is not None else native, native_input_size=native,
        weights={"name": repr(entry), "file": str(path), "sha256": digest, "url": entry.url,
                 "transforms": transforms},
        origins={"normalization": "--normalize" if normalize is not None else "weights",
                 "input_size": "--input-size" if size is not None else ("weights" if native else None)})


# ---------------------------------------------------------------- layers

def module_type_name(module: nn.Module) -> str:
    """Class name; for TorchScript submodules the original Python class name."""
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", type(module).__name__)
    return type(module).__name__


def conv_layer_names(module: nn.Module) -> list[str]:
    """Dotted names of every nn.Conv2d (TorchScript modules included), in definition order."""
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d) or (isinstance(m, torch.jit.ScriptModule)
                                             and module_type_name(m) == "Conv2d")]


def default_layers(loaded: LoadedModel) -> list[str]:
    """The checkpoint's grouped layers when it has any, else every Conv2d."""
    if loaded.groups:
        return list(loaded.groups)
    return conv_layer_names(loaded.module)
