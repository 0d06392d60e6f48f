"""Capture layer outputs by dotted name, with hooks that never outlive their `with` block."""
from __future__ import annotations

import difflib
import logging
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from broden.errors import InputError

__all__ = ["LayerRecorder", "layer_shapes", "resolve_layers", "StopForward"]

log = logging.getLogger(__name__)

# Listing hundreds of names (ResNet-152) in one error helps nobody; past this, point at `dissect layers`.
_MAX_LISTED = 60


class StopForward(Exception):
    """Raised inside the forward pass once every requested layer ran; LayerRecorder swallows it."""


def resolve_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map each dotted name to its submodule; unknown names fail listing close matches and valid names."""
    names = list(dict.fromkeys(names))  # keep order, drop repeats
    if not names:
        raise InputError("layers: no layer names given (expected dotted module names such as 'features.10')")
    # named_modules, not get_submodule: TorchScript modules do not support get_submodule.
    modules = {n: m for n, m in model.named_modules() if n}
    unknown = [n for n in names if n not in modules]
    if unknown:
        valid = list(modules)
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        if len(valid) <= _MAX_LISTED:
            listing = f"valid names: {', '.join(valid)}"
        else:
            listing = (f"valid names include: {', '.join(valid[:_MAX_LISTED])}, ... ({len(valid)} in all; "
                       f"`dissect layers MODEL --all` lists them)")
        raise InputError(f"--layers: unknown layer {', '.join(hints)} in {type(model).__name__}; {listing}")
    return {n: modules[n] for n in names}


class LayerRecorder:
    """Context manager recording the outputs (detached, float32) of named submodules.

    `with LayerRecorder(model, ["features.10"]) as rec: model(x)` leaves the output in
    `rec.outputs["features.10"]`. With `stop_after_last=True` the forward pass is cut
    short once every requested layer ran (the rest of the block is skipped too, so put
    the model call last, or use `rec.forward(x)`, which stops only the model call).
    A module called several times in one pass keeps its last output.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], stop_after_last: bool = False,
                 allow_non_tensor: bool = False) -> None:
        self.model = model
        self.layers = resolve_layers(model, names)  # fails before any hook exists
        self.names = list(self.layers)
        self.stop_after_last = stop_after_last
        self.allow_non_tensor = allow_non_tensor  # skip (rather than reject) layers returning tuples etc.
        self.outputs: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        self._handles: list[Any] = []

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                # copy: a following in-place op (torchvision's ReLU(inplace=True)) would rewrite it
                self.outputs[name] = output.detach().to(torch.float32, copy=True)
            elif not self.allow_non_tensor:
                raise InputError(f"layer {name!r} ({type(module).__name__}) outputs a {type(output).__name__}, "
                                 f"expected a tensor; choose a layer that returns a feature map")
            self._seen.add(name)
            if self.stop_after_last and len(self._seen) == len(self.names):
                raise StopForward()
        return hook

    def __enter__(self) -> "LayerRecorder":
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except RuntimeError as e:
            self.remove()
            if isinstance(self.model, torch.jit.ScriptModule):
                raise InputError(f"TorchScript models do not support forward hooks, so their inner layers "
                                 f"cannot be recorded ({e}); dissect the original model, or its state_dict "
                                 f"with --arch, instead") from e
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.remove()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def remove(self) -> None:
        """Remove every hook this recorder added (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget recorded outputs, e.g. between batches."""
        self.outputs = {}
        self._seen = set()

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the model once on fresh state and return the recorded outputs; StopForward ends only this call."""
        self.clear()
        try:
            self.model(*args, **kwargs)
        except StopForward:
            pass
        missing = [n for n in self.names if n not in self._seen]
        if missing:
            log.debug("layers not run in this forward pass: %s", ", ".join(missing))
        return self.outputs


def layer_shapes(model: nn.Module, names: Sequence[str], input_size: tuple[int, int],
                 device: str | torch.device = "cpu", strict: bool = True) -> dict[str, tuple[int, ...]]:
    """Output shape without the batch dimension ((C, h, w) for conv layers) from one zero-image forward.

    With strict=False, layers that did not run or return no tensor are left out instead of failing.
    """
    h, w = (int(s) for s in input_size)
    if h <= 0 or w <= 0:
        raise InputError(f"--input-size: expected positive sizes, got {tuple(input_size)}")
    modes = [(m, m.training) for m in model.modules()]  # restore each: callers may mix modes (frozen BN)
    model.eval()  # batch statistics of a single zero image would be meaningless, and must not be stored
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, h, w, device=device)  # (1, 3, H, W)
            with LayerRecorder(model, names, stop_after_last=True, allow_non_tensor=not strict) as rec:
                out = rec.forward(x)
    finally:
        for m, training in modes:
            m.training = training
    missing = [n for n in rec.names if n not in out]
    if strict and missing:
        raise InputError(f"layers {', '.join(missing)} did not run in a forward pass of a "
                         f"{h}x{w} image; choose layers on the path from input to output")
    return {n: tuple(out[n].shape[1:]) for n in rec.names if n in out}
