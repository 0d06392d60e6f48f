"""Soft receptive fields (CGL paper eq. 1, Figure 5) of chosen units over their top images.

The only part of the reports that runs a model: the dissected model is loaded
from summary["model"]["source"] and fed the unit's top images (preprocessed
with the normalisation and input size the dissection recorded). psi follows
the CGL design (shared/design/cgl.md):

- a conv followed directly by a BatchNorm2d (cgl_train.groups.find_following_bn):
  psi = sigmoid(P1 * tau + P2), tau = bn_output / gamma (eq. 4), the BN in eval
  mode (running statistics);
- otherwise: psi = sigmoid(P1 * a / S + P2), a = the layer's output (the
  pre-activation for a conv), S = the unit's std over the shown images (eq. 1).
  A BN that follows a conv inside a custom module (a ResNet block) is not
  detectable from the module tree, so such convs get this formula too.

The formula used, and the colour scale (psi_scale: percentiles of the values
shown, with a colour bar), are written under each figure. No dissection
statistic is recomputed.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from broden.errors import InputError
from cgl_train.losses import soft_receptive_field, soft_receptive_field_bn
from dissect.preprocess import preprocess  # the dissection's own transform, so psi sees what it saw
from dissect.groups import find_following_bn
from dissect.hooks import LayerRecorder
from reports.figures import save_figure
from reports.results import RunResults, safe_name


__all__ = ["parse_psi_units", "preprocess", "unit_psi", "psi_source", "layer_psi", "check_model_file",
           "render_psi_figures", "psi_figure", "psi_scale", "SCALE_PERCENTILES"]

log = logging.getLogger(__name__)


def parse_psi_units(specs: Sequence[str] | None) -> dict[str, list[int]]:
    """Parse `LAYER:U,U` strings (repeatable; the last ':' splits, so layer names may hold ':')."""
    result: dict[str, list[int]] = {}
    for spec in specs or []:
        layer, sep, units = spec.rpartition(":")
        if not sep or not layer or not units:
            raise InputError(f"--psi-units {spec!r}: expected LAYER:UNIT[,UNIT...], e.g. conv2:5,17")
        try:
            numbers = [int(u) for u in units.split(",") if u.strip()]
        except ValueError as e:
            raise InputError(f"--psi-units {spec!r}: units must be 0-based integers separated by commas") from e
        if not numbers:
            raise InputError(f"--psi-units {spec!r}: no unit given")
        result.setdefault(layer, [])
        result[layer] += [u for u in numbers if u not in result[layer]]
    return result


def unit_psi(pre: torch.Tensor, p1: float = 1.0, p2: float = 0.0, eps: float = 1e-5) -> torch.Tensor:
    """psi of one unit over its shown images: pre (k, h, w) -> (k, h, w) in (0, 1).

    S is the unit's std over these k images (all positions), as eq. 1 takes it over a minibatch.
    """
    return soft_receptive_field(pre[:, None], p1, p2, eps=eps)[:, 0]


def _load_images(paths: Sequence[str], images_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in paths:
        try:
            with Image.open(images_dir / p) as im:
                out[p] = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise InputError(f"--psi-units: cannot read top image {images_dir / p} ({e}); psi maps need "
                             "the dataset the run was dissected on") from e
    return out


def psi_source(module: torch.nn.Module, layer: str) -> tuple[str, str | None]:
    """("bn", BN module name) when a BatchNorm2d follows conv `layer` (dissect.groups.find_following_bn's
    rule, the one the dissection's BN-aware relevance uses), else ("std", None)."""
    target = dict(module.named_modules()).get(layer)
    if isinstance(target, torch.nn.Conv2d):
        bn = find_following_bn(module, layer)
        if bn is not None:
            return "bn", bn
    return "std", None


def _layer_outputs(module: torch.nn.Module, layer: str, images: Mapping[str, np.ndarray],
                   normalization: Mapping[str, Sequence[float]], input_size: int | None,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Layer output (C, h, w) per image, one forward pass per image size."""

    by_size: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for p, arr in images.items():
        by_size[arr.shape].append(p)
    result = {}
    with LayerRecorder(module, [layer]) as rec, torch.no_grad():
        for names in by_size.values():
            batch = torch.from_numpy(np.stack([images[p] for p in names])).permute(0, 3, 1, 2).to(device)
            out = rec.forward(preprocess(batch, normalization, input_size))[layer]  # (n, C, h, w)
            if out.dim() != 4:
                raise InputError(f"--psi-units {layer}: the layer outputs shape {tuple(out.shape)}, "
                                 "expected a (N, C, h, w) feature map")
            result.update(zip(names, out))
    return result


def layer_psi(module: torch.nn.Module, layer: str, images: Mapping[str, np.ndarray],
              chosen: Mapping[int, Sequence[str]], normalization: Mapping[str, Sequence[float]],
              input_size: int | None, p1: float = 1.0, p2: float = 0.0, eps: float = 1e-5,
              device: torch.device | str = "cpu") -> tuple[str, str | None, dict[int, torch.Tensor]]:
    """psi of chosen units of `layer` over their images: (formula name, BN name or None, unit -> (k, h, w)).

    `images` maps a path to an (H, W, 3) uint8 array; `chosen` maps a unit to the paths of its images.
    The formula is "bn" for a conv followed by a BatchNorm2d, else "std" (see the module docstring).
    """
    formula, bn_name = psi_source(module, layer)
    recorded = bn_name if bn_name is not None else layer
    outputs = _layer_outputs(module, recorded, images, normalization, input_size, torch.device(device))
    gamma = None
    if bn_name is not None:
        bn = module.get_submodule(bn_name)
        # a BN without affine parameters has gamma = 1 (tau is then the normalised pre-activation)
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
    result: dict[int, torch.Tensor] = {}
    for u, paths in chosen.items():
        if not paths:
            continue
        channels = outputs[paths[0]].shape[0]
        if not 0 <= u < channels:
            raise InputError(f"--psi-units {layer}:{u}: the model's layer has {channels} channels")
        maps = torch.stack([outputs[p][u] for p in paths])  # (k, h, w)
        if gamma is None:
            result[u] = unit_psi(maps, p1, p2, eps).cpu()
        else:
            g = gamma[u: u + 1].to(maps.device, torch.float32)  # (1,)
            result[u] = soft_receptive_field_bn(maps[:, None], g, p1, p2, eps=eps)[:, 0].cpu()
    return formula, bn_name, result


# The colour scale spans these percentiles of the psi values shown: psi is >= 0.5 wherever the
# pre-activation is positive, so a fixed 0..1 scale paints every firing region the same colour.
SCALE_PERCENTILES = (1.0, 99.0)
_MIN_SPAN = 1e-3  # a (nearly) constant psi still gets a readable, honest scale


def _ordinal(p: float) -> str:
    n = f"{p:g}"
    if not n.isdigit():
        return f"{n}th"
    last2, last = int(n) % 100, int(n) % 10
    return n + ("th" if 11 <= last2 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(last, "th"))


def psi_scale(heats: Sequence[np.ndarray]) -> dict[str, Any]:
    """The colour scale of a psi figure: {vmin, vmax, rule} from SCALE_PERCENTILES of the values shown."""
    values = np.concatenate([np.asarray(h, dtype=np.float64).ravel() for h in heats])
    lo, hi = (float(v) for v in np.percentile(values, SCALE_PERCENTILES))
    if hi - lo < _MIN_SPAN:
        mid = (lo + hi) / 2
        lo, hi = max(0.0, mid - _MIN_SPAN / 2), min(1.0, mid + _MIN_SPAN / 2)
    p_lo, p_hi = SCALE_PERCENTILES
    return {"vmin": lo, "vmax": hi,
            "rule": f"colour scale psi {lo:.3f} to {hi:.3f}: the {_ordinal(p_lo)} to {_ordinal(p_hi)} percentile "
                    f"of the psi values shown (psi >= 0.5 wherever the pre-activation is positive, so a 0..1 "
                    f"scale would saturate); values outside are clipped to the ends"}


def psi_figure(images: Sequence[np.ndarray], psi: torch.Tensor, title: str) -> tuple[Figure, dict[str, Any]]:
    """psi heat maps over their images, one panel each, with a colour bar of the scale used (psi_scale)."""
    k = len(images)
    fig = Figure(figsize=(1.9 * k + 1.2, 2.4))
    axes = fig.subplots(1, k, squeeze=False)[0]
    heats = [F.interpolate(p[None, None].float(), size=img.shape[:2], mode="bilinear",
                           align_corners=False)[0, 0].numpy() for img, p in zip(images, psi)]  # (H, W) each
    scale = psi_scale(heats)
    mappable = None
    for ax, img, heat in zip(axes, images, heats):
        ax.imshow(img)
        mappable = ax.imshow(heat, cmap="viridis", alpha=0.6, vmin=scale["vmin"], vmax=scale["vmax"])
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        p_lo, p_hi = SCALE_PERCENTILES
        fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.02,
                     label=f"psi ({p_lo:g}-{p_hi:g}th pct. shown)")
    fig.suptitle(title, fontsize=9)
    return fig, scale


def check_model_file(summary: Mapping[str, Any], allow_mismatch: bool = False) -> None:
    """Refuse (InputError) a model file whose sha256 differs from summary.json's fingerprint.

    psi maps of other weights would not show the units the run labelled; `allow_mismatch`
    draws them anyway, with a warning. Checked before the file is loaded: a replaced pickle
    must not run. A source that is not a file is left to load_model's own error.
    """
    from broden.download import sha256_file

    info = summary["model"]
    source, recorded = Path(str(info.get("source"))), info.get("fingerprint")
    if not source.is_file() or recorded is None:
        return
    now = sha256_file(source)
    if now == recorded:
        return
    what = (f"--psi-units: the model file {source} changed since the dissection: its sha256 is {now}, "
            f"summary.json recorded {recorded}")
    if not allow_mismatch:
        raise InputError(f"{what}; psi maps of other weights would not show the dissected units. Restore the "
                         f"file, or pass --allow-model-mismatch to draw them anyway")
    log.warning("%s; drawing psi maps with it anyway (--allow-model-mismatch)", what)


def render_psi_figures(run: "RunResults", psi_units: Mapping[str, Sequence[int]], fig_dir: str | Path,
                       p1: float = 1.0, p2: float = 0.0, top_k: int | None = None, device: str = "cpu",
                       trust_pickle: bool = False, eps: float = 1e-5,
                       allow_model_mismatch: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Draw psi heat maps over each chosen unit's top images; returns layer -> [{unit, path, caption}].

    The model file must still match summary.json's fingerprint unless `allow_model_mismatch`
    (check_model_file).
    """
    from dissect.models import load_model

    summary = run.summary
    check_model_file(summary, allow_model_mismatch)
    model_info = summary["model"]
    images_dir = Path(summary["dataset"]["root"]) / "images"
    if not images_dir.is_dir():
        raise InputError(f"--psi-units: the dataset images are gone from {images_dir}; psi maps need them")
    arch = model_info.get("arch") if model_info.get("kind") in ("state_dict", "pretrained") else None
    if model_info.get("kind") == "pretrained" and model_info.get("weights"):  # torchvision's, from the hub cache
        from dissect.models import load_requested

        loaded = load_requested(None, arch=arch, weights=model_info["weights"]["name"])
    else:
        loaded = load_model(model_info["source"], arch=arch, trust_pickle=trust_pickle)
    dev = torch.device(device)
    module = loaded.module.to(dev).eval()
    # The recorded preprocessing is what the dissection saw; it wins over the loader's defaults.
    normalization = model_info.get("normalization") or loaded.normalization
    input_size = summary.get("options", {}).get("input_size") or model_info.get("input_size")

    figures: dict[str, list[dict[str, Any]]] = {}
    for layer_name, units in psi_units.items():
        layer = run.layer(layer_name)
        by_unit = {int(u["unit"]): u for u in layer.units["units"]}
        chosen = {u: [t["image"] for t in (by_unit[u].get("top_images") or [])[:top_k]] for u in units}
        for u, paths in chosen.items():
            if not paths:
                log.warning("%s unit %d has no top images; no psi figure", layer_name, u)
        images = _load_images(sorted({p for ps in chosen.values() for p in ps}), images_dir)
        formula, bn_name, psis = layer_psi(module, layer_name, images, chosen, normalization, input_size,
                                           p1, p2, eps, dev)
        for u, psi in psis.items():
            paths = chosen[u]
            if formula == "bn":
                how = (f"psi = sigmoid({p1:g} · tau + {p2:g}), tau = the output of {bn_name} (the BatchNorm2d "
                       f"after {layer_name}, running statistics) / its gamma (CGL eq. 4)")
            else:
                how = (f"psi = sigmoid({p1:g} · a / S + {p2:g}), a = the output of {layer_name}, S = the unit's "
                       f"std over these images (CGL eq. 1: no BatchNorm2d directly after the layer in its "
                       "nn.Sequential)")
            fig, scale = psi_figure([images[p] for p in paths], psi,
                                    f"{layer_name} unit {u}: soft receptive field (P1={p1:g}, P2={p2:g})")
            path = save_figure(fig, Path(fig_dir) / f"psi-{safe_name(layer_name)}-unit{u:04d}.png")
            caption = (f"{how}; over its top {len(paths)} images by peak activation; label "
                       f"{by_unit[u].get('label')}, IoU {float(by_unit[u].get('iou') or 0):.3f}; {scale['rule']}")
            figures.setdefault(layer_name, []).append({"unit": u, "path": str(path), "caption": caption,
                                                       "formula": formula, "bn": bn_name,
                                                       "scale": {"vmin": scale["vmin"], "vmax": scale["vmax"]}})
    return figures
