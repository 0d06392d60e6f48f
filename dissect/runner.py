"""The library entry point: `dissect.run(model, dataset, out, **options)` does all that `dissect run` does
but the HTML report (a layer above: reports.render), and `dissect.load(out)` reads the results back.

run: options -> device and process group -> model (a file, a module, or a LoadedModel) ->
dataset (a directory, a known name, 'synthetic', or a BrodenDataset) -> reuse a finished
identical run in `out` (unless force) -> remove an earlier run's stale outputs ->
pipeline.run_dissection (thresholds, tallies, labels, groups, files).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broden.errors import InputError
from dissect.config import DissectConfig, LoadOptions, RunSettings

if TYPE_CHECKING:
    from dissect.views import Dissection

__all__ = ["RunOutcome", "run", "load", "dissect_model", "split_options"]

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What a run did (inside `run`, which hands it out as a dissect.views.Dissection)."""

    out: Path | None
    reused: bool
    summary: dict[str, Any]       # summary.json's content (also for out=None)
    result: Any = field(default=None, repr=False)  # the DissectionResult, when computed now (None when reused)
    is_main: bool = True          # this process is rank 0 (the one that writes and reports)

    def view(self) -> Dissection:
        """The dissect.views.Dissection of this outcome (tables, unit views; summary.json as summary_json)."""
        from dissect.views import Dissection

        return Dissection(self.summary, self.out, reused=self.reused, result=self.result, is_main=self.is_main)


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Keyword options by the dataclass that declares them: (DissectConfig, LoadOptions, RunSettings)."""
    parts: tuple[dict[str, Any], ...] = ({}, {}, {})
    classes = (DissectConfig, LoadOptions, RunSettings)
    for key, value in options.items():
        for part, cls in zip(parts, classes):
            if key in cls.option_names():
                part[key] = value
                break
        else:
            valid = sorted(n for cls in classes for n in cls.option_names())
            raise InputError(f"unknown option {key!r}; valid options: {', '.join(valid)}")
    return parts  # type: ignore[return-value]


def run(model: Any, dataset: Any, out: str | Path | None = None, *, config: DissectConfig | None = None,
        **options: Any) -> Dissection:
    """Dissect `model` on `dataset`; write results to `out` (resumable; a finished identical run is reused).

    Returns a dissect.views.Dissection: `.summary` / `.units` DataFrames, `.unit(layer, u)`, and the
    run's record: `.out`, `.reused`, `.summary_json` (summary.json's content, also for out=None),
    `.result` (the in-memory DissectionResult when computed now, None when reused), `.is_main`.

    `model`: a model file (cgl checkpoint, state_dict + arch, TorchScript + arch, trusted pickle),
    an nn.Module or a dissect.models.LoadedModel; None or 'torchvision:NAME' with weights=... (and
    arch=NAME) for torchvision's pretrained weights, read offline from $TORCH_HOME. `dataset`: a
    Broden directory, a known name (broden1_224, ...), 'synthetic', or a broden.dataset.BrodenDataset. `options`: any
    DissectConfig, LoadOptions or RunSettings field (e.g. layers=["conv2"], arch="resnet18",
    force=True), over `config`. Under torchrun, images are sharded and rank 0 writes.
    """
    from broden._progress import quieted

    conf_values, load_values, run_values = split_options(options)
    base = config.to_dict() if config is not None else {}
    config = DissectConfig.from_dict({**base, **conf_values})
    loading = LoadOptions.from_dict(load_values)
    settings = RunSettings.from_dict(run_values)
    with quieted(settings.quiet):  # quiet=True silences every bar of the run, the pipeline's included
        return _run(model, dataset, out, config, loading, settings)


def _run(model: Any, dataset: Any, out: str | Path | None, config: DissectConfig, loading: LoadOptions,
         settings: RunSettings) -> Dissection:
    """`run` once its options are parsed."""
    from dissect import distributed
    from dissect.devices import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":
        config = dataclasses.replace(config, device=str(device))
    ctx = distributed.init_from_env(device)
    loaded = _as_loaded(model, loading, config)
    ds = _as_dataset(dataset, loaded, config, settings, ctx)

    out_path = Path(out) if out is not None else None
    # the whole run, reuse check included, holds DIR: a second run there would overwrite this one's
    # files or resume from its states (only rank 0 locks; the other ranks wait for it at a barrier)
    try:
        loaded = _with_input_size(loaded, ds, config)  # needs the images' size: after the dataset
        with _out_lock(out_path, ctx):
            return _run_in(out_path, loaded, ds, config, settings, ctx).view()
    finally:
        if ds is not dataset:  # made for this run, also when the lock was refused: a scratch store goes
            ds.close()         # (a finished decoded cache stays)


def _out_lock(out_path: Path | None, ctx: Any) -> Any:
    """The exclusive lock of the results directory (broden._locks), or a no-op without one."""
    import contextlib

    from broden._locks import locked_directory

    if out_path is None or not ctx.is_main:
        return contextlib.nullcontext()
    return locked_directory(out_path, "dissect run", option="--out")


def _run_in(out_path: Path | None, loaded: Any, ds: Any, config: DissectConfig, settings: RunSettings,
            ctx: Any) -> RunOutcome:
    """Reuse a finished identical run in `out_path`, or compute it (the directory is locked)."""
    from dissect import distributed
    from dissect.pipeline import layers_to_dissect, plan_key, run_dissection
    from dissect.results import missing_outputs, read_summary, remove_stale_outputs, summary_json

    key = plan_key(loaded, ds, config)
    if out_path is not None and not settings.force and (out_path / "summary.json").is_file():
        try:
            previous = read_summary(out_path)
        except InputError:
            previous = None
        if previous is not None and previous.get("run_key") == key:
            missing = missing_outputs(out_path, previous)
            if not missing:
                log.info("%s already holds this dissection (same model, layers, dataset and options); "
                         "reusing it", out_path)
                return RunOutcome(out_path, True, previous, is_main=ctx.is_main)
            # summary.json is written last, but files can go later (a cleanup, a partial copy)
            log.warning("%s: summary.json lists %s, which is missing (%d file(s) in all); recomputing the "
                        "dissection", out_path, missing[0], len(missing))
    if out_path is not None and ctx.is_main:
        # before any work: a report or layer folder of an earlier run must not pass for this one's
        remove_stale_outputs(out_path, layers_to_dissect(loaded, config))
    distributed.barrier(ctx)
    res = run_dissection(loaded, ds, config, out_path, ctx)
    return RunOutcome(out_path, False, summary_json(res), res, is_main=ctx.is_main)


def load(out: str | Path) -> Dissection:
    """Read a results directory: a dissect.views.Dissection (`.summary`, `.units` DataFrames, `.unit(layer, u)`)."""
    from dissect.views import Dissection

    return Dissection.from_dir(out)


def _as_loaded(model: Any, loading: LoadOptions, config: DissectConfig) -> Any:
    from torch import nn

    from dissect.hooks import resolve_layers
    from dissect.models import LoadedModel, load_requested, model_from_module

    if isinstance(model, (LoadedModel, nn.Module)) and loading.weights is not None:
        raise InputError(f"weights={loading.weights!r}: names torchvision's pretrained weights to load; the "
                         f"model passed is already built ({type(model).__name__}): pass model=None and arch=NAME")
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = model_from_module(model, normalization=config.normalize, input_size=config.input_size)
    else:
        # a model file, or (model None or 'torchvision:NAME') torchvision's weights from the hub cache
        loaded = load_requested(model, arch=loading.arch, weights=loading.weights,
                                trust_pickle=loading.trust_pickle, normalize=config.normalize,
                                input_size=config.input_size, num_classes=loading.num_classes)
    if config.layers:
        resolve_layers(loaded.module, config.layers)  # unknown names fail before any work
    return loaded


def _with_input_size(loaded: Any, ds: Any, config: DissectConfig) -> Any:
    """`loaded` with the input size to use and the record of why (dissect.input_size, --input-size-rule)."""
    from dissect.input_size import data_image_size, decide_input_size

    return decide_input_size(loaded, data_image_size(ds), config.input_size, config.input_size_rule)


def _as_dataset(dataset: Any, loaded: Any, config: DissectConfig, settings: RunSettings, ctx: Any) -> Any:
    """The BrodenDataset to dissect, with its decoded cache (docs/architecture.md, "data path").

    --decoded-cache auto: read a fresh cache; else, on one process, the first pass writes it as it
    decodes (persistent when the selection is every row of index.csv, a scratch store removed after
    the run otherwise), and under torchrun rank 0 builds it first when no --split/--limit narrows the
    selection. build: build it first (rank 0). off: decode on every pass. --force rebuilds it.
    """
    from broden.cache_writer import CacheSpaceError
    from broden.dataset import BrodenDataset
    from dissect import distributed
    from dissect.datasets import resolve_dataset, synthetic_source

    if isinstance(dataset, BrodenDataset):
        if dataset.images != config.images:  # the option decides which rows are dissected
            log.info("images=%r: dissecting those rows of the dataset passed (built with images=%r)",
                     config.images, dataset.images)
        return dataset.with_images(config.images)
    synthetic, reuse = synthetic_source(loaded, settings.synthetic_per_class, settings.synthetic_size)
    root = resolve_dataset(dataset, settings.cache_dir, settings.download, settings.mirrors, synthetic,
                           settings.quiet, synthetic_reuse=reuse)
    links = settings.allow_outside_links
    mode = settings.decoded_cache
    whole = config.split is None and config.limit is None
    upfront = mode == "build" or (mode == "auto" and ctx.world_size > 1 and whole)
    if upfront and ctx.is_main:
        from broden.cache import build_cache
        from broden.format import load_meta

        try:
            build_cache(root, cache_dir=settings.cache_dir, progress=not settings.quiet, force=settings.force,
                        fingerprint_mode=settings.fingerprint,
                        meta=load_meta(root, allow_outside_links=True) if links else None)
        except CacheSpaceError as e:
            log.warning("%s. Running without the decoded cache", e)
    distributed.barrier(ctx)
    cache: Any = "off" if mode == "off" else (settings.cache_dir or "auto")
    # after an upfront build the cache is fresh: rebuild only when streaming does the building
    stream = mode == "auto" and ctx.world_size == 1
    return BrodenDataset(root, categories=config.categories, split=config.split, limit=config.limit, cache=cache,
                         allow_outside_links=links, images=config.images, fingerprint=settings.fingerprint,
                         write_cache=stream, rebuild=settings.force and stream)


def dissect_model(model: Any, dataset: Any, layers: list[str] | None = None,
                  config: DissectConfig | None = None, out: str | Path | None = None) -> Any:
    """`run` that always computes and returns the in-memory DissectionResult (`out`: written, resumable)."""
    extra = {} if layers is None else {"layers": list(layers)}
    return run(model, dataset, out, config=config, force=True, **extra).result
