"""`dissect layers MODEL`: list layer names, module types and output shapes, to choose --layers."""
from __future__ import annotations

import argparse

from dissect.config import LoadOptions
from dissect.options import add_flags

# torch and the model code load in run(), so `dissect --help` stays fast.
DEFAULT_INPUT_SIZE = 224


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `layers` subcommand."""
    p = subparsers.add_parser(
        "layers", help="list a model's layers and their output shapes",
        description="List layer names (for --layers), module types and output shapes (C, h, w). "
                    "Shows every Conv2d by default, every module with --all. A TorchScript archive "
                    "shows output shapes only with --arch (its weights are loaded into that eager model, "
                    "as `dissect run` needs).")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="checkpoint, state_dict (with --arch), TorchScript archive or pickled module; left out "
                        "with --arch NAME --weights W (torchvision's pretrained weights, as `dissect run`)")
    add_flags(p, LoadOptions)
    p.add_argument("--input-size", type=int, metavar="N", default=None,
                   help=f"input image side in pixels (default: the checkpoint's, else {DEFAULT_INPUT_SIZE})")
    p.add_argument("--all", action="store_true", help="list every module, not only Conv2d layers")
    p.set_defaults(func=run)


def _format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the model, run one zero image through it and print the layer table."""
    import torch

    from dissect.hooks import layer_shapes
    from dissect.models import conv_layer_names, load_requested, module_type_name

    loading = LoadOptions.from_args(args)
    loaded = load_requested(args.model, arch=loading.arch, weights=loading.weights, trust_pickle=loading.trust_pickle,
                            input_size=args.input_size, num_classes=loading.num_classes, allow_script=True)
    size = loaded.input_size or DEFAULT_INPUT_SIZE
    module = loaded.module
    modules = dict(module.named_modules())
    names = [n for n in modules if n] if args.all else conv_layer_names(module)
    print(f"model: {loaded.source} ({loaded.kind}{', ' + loaded.arch if loaded.arch else ''}), "
          f"input {size}x{size}")
    if not names:
        print("no Conv2d layers; use --all to list every module")
        return 0

    note = ""
    if isinstance(module, torch.jit.ScriptModule):
        shapes: dict[str, tuple[int, ...]] = {}
        note = ("output shapes need forward hooks, which TorchScript models do not support; pass --arch NAME "
                "to load the weights into the eager model (as `dissect run` requires)")
    else:
        shapes = layer_shapes(module, names, (size, size), strict=not args.all)

    header = ("layer", "type", "output (C, h, w)")
    grouped = bool(loaded.groups)
    if grouped:
        header += ("groups",)
    rows = []
    for name in names:
        shape = shapes.get(name)
        row = (name, module_type_name(modules[name]), str(shape) if shape is not None else "-")
        if grouped:
            cfg = loaded.groups.get(name)
            row += (f"{cfg['groups']}" if cfg else "",)
        rows.append(row)
    print(_format_table(rows, header))
    if note:
        print(f"note: {note}")
    elif args.all and len(shapes) < len(names):
        print("'-': the module did not run on this input or returns no single tensor")
    return 0
