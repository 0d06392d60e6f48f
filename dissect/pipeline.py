"""The dissection, as the paper tells it: load -> thresholds -> tally -> label -> write.

Stage 1 makes one pass over the images for all layers (forward, per-unit
quantile thresholds, top images); stage 2 makes a second pass (kept activations
or a fresh forward) that upsamples, thresholds (`up > T`, strict) and tallies
IoU counts, and (--top-images-tiebreak area) ranks the top images again with
peak ties broken by the mask area it counted. After labelling, stage 3
(--label-strips on) ranks each unit's images by its mask's intersection with
its label. Both passes read contiguous index ranges with dataset.get_batch,
save their state every few batches (dissect.state) and, under torchrun, run on
this rank's shard and merge exactly (dissect.distributed).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from broden.errors import InputError
from broden.loader import Prefetcher, iter_batches, thread_plan, torch_threads
from dissect.config import DissectConfig
from dissect.devices import activation_budget_mb, float32_math, resolve_device
from dissect.distributed import DistContext, barrier, merge_stats, shard_range
from dissect.given_thresholds import assign_threshold_files, load_given_thresholds
from dissect.groups import (concept_groups, equal_groups, following_bn, group_of_units, group_relevance,
                            layout_from_spec)
from dissect.hooks import LayerRecorder, layer_shapes, resolve_layers
from dissect.label_images import LabelStripBatch, label_intersections, label_intersections_from_pixels
from dissect.labels import label_units, layer_label_summary
from dissect.mask_store import MaskPixelStore
from dissect.preprocess import preprocess
from dissect.provenance import software_versions
from broden._progress import progress
from dissect.results import DatasetInfo, DissectionResult, LayerResult, layer_dirname, write_results
from dissect.spatial import MaskPixels, MaskStats, layer_spatial_summary, pixel_shape_stats, top_image_pixels
from dissect.state import RunState, run_key
from dissect.stats import IoUTally, StreamingStat, TopImages, TopQuantile, iou_from_counts

__all__ = ["run_dissection", "plan_key", "effective_config", "layers_to_dissect", "dataset_info"]

log = logging.getLogger(__name__)


def run_dissection(loaded: Any, dataset: Any, config: DissectConfig, out: str | Path | None = None,
                   ctx: DistContext = DistContext()) -> DissectionResult:
    """The paper's story: load, threshold, tally, label, write (rank 0 writes when `out` is given)."""
    config = effective_config(loaded, dataset, config)
    torch.manual_seed(config.seed)  # the engine draws no random numbers; seeded for any model that does
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    model = loaded.module.to(device).eval()
    layers = layers_to_dissect(loaded, config)
    info = dataset_info(dataset)
    key = run_key(loaded.fingerprint, layers, info.fingerprint, config.result_key())
    state = RunState(out, key, ctx.rank, ctx.world_size, config.batch_size)
    if out is not None and ctx.is_main:
        # an older summary.json must not make a half-written directory look complete
        (Path(out) / "summary.json").unlink(missing_ok=True)
    torch_n, loader_n = thread_plan(config.threads, config.loader_threads, device, processes=ctx.local_processes)
    config = dataclasses.replace(config, threads=torch_n, loader_threads=loader_n)  # recorded as used
    log.info("threads: %d torch intra-op, %d loading ahead", torch_n, loader_n)
    timings: dict[str, float] = {}
    # the run's thread budget (the caller's count comes back after); float32 unless --tf32 on
    with torch_threads(torch_n), float32_math(device, config.tf32 == "on"):
        engine = _Engine(model, layers, dataset, config, loaded.normalization, device, ctx, state,
                         loader_threads=loader_n)
        given = load_given_thresholds(config.thresholds, layers, {n: s[0] for n, s in engine.shapes.items()})
        t = time.perf_counter()
        thresholds, tops = engine.stage1(skip_quantile=set(given))  # per-unit quantile + top images
        # given thresholds keep their dtype: float64 ones are compared in float64 by --upsample pil
        thresholds.update({n: torch.from_numpy(g.values).to(device) for n, g in given.items()})
        timings["thresholds"] = time.perf_counter() - t
        t = time.perf_counter()
        tallies, area_tops = engine.stage2(thresholds)           # I, A, G per unit and label
        if area_tops is not None:  # peak ties broken by the mask area, known only now
            tops = area_tops
        timings["tally"] = time.perf_counter() - t
    t = time.perf_counter()

    def label(name: str) -> LayerResult:
        return _label_layer(name, engine.shapes[name], thresholds[name], tops[name], tallies[name], info, config,
                            model, loaded.groups, dataset, engine.pixels)

    # Layers are labelled side by side: their mask compactness is mostly scikit-image and numpy,
    # which run on one core each and release the GIL; each layer's result depends on it alone.
    # Prefetcher keeps the layer order, and an error cancels the layers queued after it.
    with torch_threads(torch_n), Prefetcher(label, layers, threads=max(1, min(torch_n, len(layers)))) as labelled:
        results = list(labelled)
    if config.label_strips != "on":
        engine.pixels = None  # no later pass reads them
    for lr in results:
        lr.given_thresholds = given.get(lr.name)
    timings["label"] = time.perf_counter() - t
    if config.label_strips == "on":
        t = time.perf_counter()
        with torch_threads(torch_n), float32_math(device, config.tf32 == "on"):
            label_tops = engine.stage3(thresholds, {lr.name: torch.as_tensor(lr.labels.top_label)
                                                    for lr in results})
        for lr in results:
            lt = label_tops[lr.name]
            lr.label_top_indices, lr.label_top_intersections = lt["indices"], lt["intersections"]
            lr.label_top_maps = lt["maps"]
        timings["label_strips"] = time.perf_counter() - t
    # not a stage: the part of the passes above spent waiting for batches (0 when loading keeps ahead)
    timings["data_wait"] = engine.data_wait
    log.info("the passes waited %.2f s for the loader", engine.data_wait)

    res = DissectionResult(options=config.to_dict(), seed=config.seed, model=loaded.describe(),
                           dataset=info, layers=results, versions=software_versions(), timings=timings,
                           run_key=key)
    if out is not None and ctx.is_main:
        write_results(res, out)
    barrier(ctx)
    if ctx.is_main:
        state.clear()
    return res


def plan_key(loaded: Any, dataset: Any, config: DissectConfig) -> str:
    """The run key (model + layers + dataset + result options) that names this dissection."""
    config = effective_config(loaded, dataset, config)
    return run_key(loaded.fingerprint, layers_to_dissect(loaded, config), dataset_info(dataset).fingerprint,
                   config.result_key())


def effective_config(loaded: Any, dataset: Any, config: DissectConfig) -> DissectConfig:
    """A validated copy of `config` holding the values the run really uses (what summary.json records).

    The model's input size is the default of input_size; the dataset's selection fills
    categories/split/limit; requested layers are put in network order. An explicit option that
    contradicts the given model or dataset is an InputError rather than silently ignored.
    """
    from dissect.models import resolve_normalization

    config = dataclasses.replace(config).validate()
    if loaded.input_size is not None:
        if config.input_size is None:
            config.input_size = loaded.input_size
        elif config.input_size != loaded.input_size:
            raise InputError(f"input_size {config.input_size}: the model was loaded with input size "
                             f"{loaded.input_size}; leave input_size None or load the model with the size wanted")
    if config.normalize is not None and resolve_normalization(config.normalize) != loaded.normalization:
        raise InputError(f"normalize {config.normalize!r}: the model was loaded with normalisation "
                         f"{loaded.normalization}; leave normalize None or load the model with it")
    _apply_selection(config, dataset)
    if config.layers:
        config.layers = layers_to_dissect(loaded, config)
    if config.thresholds:  # LAYER=absolute path, in network order: what summary.json records
        files = assign_threshold_files(config.thresholds, layers_to_dissect(loaded, config))
        config.thresholds = [f"{layer}={path}" for layer, path in files.items()]
    return config


def _apply_selection(config: DissectConfig, dataset: Any) -> None:
    """Fill categories/split/limit from the dataset; an explicit value must match it."""
    every = list(dataset.categories) == list(dataset.meta.categories)
    used = {"categories": None if every else list(dataset.categories),
            "split": getattr(dataset, "split", None), "limit": getattr(dataset, "limit", None)}
    given = config.categories
    if given is not None:
        given = [given] if isinstance(given, str) else list(given)
        # categories are always applied in category.csv order, so compare as sets
        if set(given) != set(dataset.categories):
            raise InputError(f"categories {given}: the dataset passed selects {list(dataset.categories)}; "
                             f"leave categories None or build the dataset with them")
        used["categories"] = list(dataset.categories)
    for name in ("split", "limit"):
        value = getattr(config, name)
        if value is not None and value != used[name]:
            raise InputError(f"{name} {value!r}: the dataset passed was built with {name}={used[name]!r}; "
                             f"leave {name} None or build the dataset with it")
    config.categories, config.split, config.limit = used["categories"], used["split"], used["limit"]
    rule = getattr(dataset, "images", None)
    if rule is not None and rule != config.images:
        raise InputError(f"images {config.images!r}: the dataset passed was built with images={rule!r}; "
                         f"pass images={rule!r} or build the dataset with images={config.images!r}")


# ---------------------------------------------------------------- setup

def layers_to_dissect(loaded: Any, config: DissectConfig) -> list[str]:
    """config.layers (in network order, repeats dropped), else the model's default layers
    (checkpoint groups, else every Conv2d)."""
    from dissect.models import default_layers

    if config.layers:
        layers = list(resolve_layers(loaded.module, config.layers))  # unknown names fail here, with hints
    else:
        layers = default_layers(loaded)
    # network order, whatever the --layers order: "the last two layers" must mean the deepest two
    order = {name: i for i, (name, _) in enumerate(loaded.module.named_modules())}
    layers.sort(key=lambda name: order.get(name, len(order)))
    if not layers:
        raise InputError("--layers: the model has no Conv2d layers; name the layers to dissect")
    for name in layers:
        layer_dirname(name)
    return layers


def dataset_info(dataset: Any) -> DatasetInfo:
    """Provenance and label tables of a BrodenDataset."""
    from broden.cache import source_fingerprint

    meta = dataset.meta
    # the dataset's own (computed once, in its --fingerprint mode); any other dataset: by stat
    fingerprint = getattr(dataset, "fingerprint", None) or source_fingerprint(meta.root, meta=meta)
    return DatasetInfo(root=str(meta.root), fingerprint=fingerprint,
                       num_images=len(dataset), categories=list(dataset.categories),
                       all_categories=list(meta.categories), label_names=list(meta.label_names),
                       label_category=np.asarray(_label_category(dataset), dtype=np.int64),
                       images=[r.image for r in meta.records],
                       dropped_images=int(getattr(dataset, "dropped_images", 0)),
                       zero_named=0 in meta.labels)


def _label_category(dataset: Any) -> np.ndarray:
    """Primary category per id among the dataset's selected categories (index into meta.categories)."""
    return getattr(dataset, "label_category", dataset.meta.label_category)


# ---------------------------------------------------------------- the two passes

class _Saver:
    """Save a stage's state every `save_every` batches, once `save_interval_s` passed since the last save.

    Both conditions must hold: states of big layers weigh hundreds of MB, and a fast (GPU) run
    should not spend its time writing them.
    """

    def __init__(self, state: RunState, stage: str, config: DissectConfig):
        self.state, self.stage = state, stage
        self.every, self.interval = config.save_every, config.save_interval_s
        self.batches = 0
        self.last = time.monotonic()

    def tick(self, nxt: int, payload: Any, final: bool = False) -> None:
        """Count a batch (or the stage's end, `final`); `payload(nxt)` builds the state when saving."""
        if not final:
            self.batches += 1
        if not self.state.enabled or (not final and self.batches % self.every):
            return
        if time.monotonic() - self.last < self.interval:
            return
        self.state.save(self.stage, payload(nxt))
        self.last = time.monotonic()


@dataclass
class _Engine:
    model: nn.Module
    layers: list[str]
    dataset: Any
    config: DissectConfig
    normalization: dict[str, list[float]]
    device: torch.device
    ctx: DistContext
    state: RunState
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    kept: list[dict[str, torch.Tensor]] | None = None
    loader_threads: int = 1
    spare_bytes: int = 0  # the activation budget left beside the kept activations (for `pixels`)
    pixels: MaskPixelStore | None = None  # stage 2's mask pixels, for the label stage and stage 3
    data_wait: float = 0.0  # seconds the passes spent waiting for the loader (Prefetcher.waited)

    def __post_init__(self) -> None:
        n = len(self.dataset)
        if n == 0:
            raise InputError("the dataset selection holds no images (check --split/--limit)")
        self.start, self.end = shard_range(n, self.ctx.rank, self.ctx.world_size, self.config.batch_size)
        first = self.dataset.get_batch([0])
        h, w = first["image"].shape[-2:]
        if self.config.input_size:
            h = w = self.config.input_size
        shapes = layer_shapes(self.model, self.layers, (h, w), device=self.device)
        for name, s in shapes.items():
            if len(s) != 3:
                raise InputError(f"layer {name!r} outputs shape {s}; dissection needs (C, h, w) feature maps")
        self.shapes = {k: tuple(int(x) for x in v) for k, v in shapes.items()}

    def _bar_args(self) -> dict[str, Any]:
        return {} if self.ctx.is_main else {"disable": True}  # one bar per job, not per rank

    def _batches(self, begin: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(start, batch) from `begin` to the shard's end, read ahead by loader threads (same order, same contents)."""
        bs = self.config.batch_size
        ranges = [(s, min(s + bs, self.end)) for s in range(begin, self.end, bs)]
        with iter_batches(self.dataset, ranges, self.loader_threads, pin_memory=self.device.type == "cuda") as it:
            try:
                yield from it  # leaving the loop early (an error, a kill) stops the threads
            finally:
                self.data_wait += it.waited

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = preprocess(images.to(self.device, non_blocking=True), self.normalization,
                       self.config.input_size)  # (B, 3, H, W)
        with torch.no_grad(), LayerRecorder(self.model, self.layers, stop_after_last=True) as rec:
            return rec.forward(x)

    def _keep_decision(self) -> bool:
        per_image = sum(c * h * w * 4 for c, h, w in self.shapes.values())
        need = per_image * (self.end - self.start)
        if self.config.keep_activations == "no":
            return False
        # recorded as given (None: from the free memory, which differs from run to run); the log says the value
        budget = activation_budget_mb(self.config.activation_budget_mb, self.device, self.ctx.local_processes)
        self.spare_bytes = max(0, budget * 2 ** 20 - need)
        if self.config.keep_activations == "yes":
            return True
        keep = need <= budget * 2 ** 20
        log.info("activations need %.1f MiB; budget %d MiB: %s", need / 2 ** 20, budget,
                 "kept between stages" if keep else "recomputed in each later stage")
        return keep

    def _restore(self, stage: str, stats: dict[str, dict[str, StreamingStat]]) -> int:
        """Load the saved state of `stage` into `stats` ({field: {layer: statistic}}, replaced in place);
        return the image to start at. A state that is incomplete or inconsistent is discarded
        (with a warning) and the stage starts afresh: a damaged file must not end a resumable run."""
        saved = self.state.load(stage)
        if saved is None:
            return self.start
        try:
            begin = int(saved["next"])
            if not self.start <= begin <= self.end:
                raise ValueError(f"'next' = {begin} lies outside this rank's images {self.start}..{self.end}")
            for name, per_layer in stats.items():
                for n in per_layer:  # layers with given thresholds have no quantile to restore
                    per_layer[n].load_state_dict(saved[name][n])
            self._check_position(stats, begin)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # InputError is a ValueError
            self.state.discard(stage, f"{type(e).__name__}: {e}")
            for per_layer in stats.values():
                for n in per_layer:
                    per_layer[n] = per_layer[n].empty_like()
            return self.start
        return begin

    def _check_position(self, stats: dict[str, dict[str, StreamingStat]], begin: int) -> None:
        """The quantiles' value count must be what the images before `begin` give (each has h*w per unit)."""
        for n, q in stats.get("quantiles", {}).items():
            _, h, w = self.shapes[n]
            if isinstance(q, TopQuantile) and q.count != (begin - self.start) * h * w:
                raise ValueError(f"layer {n!r} holds {q.count} values per unit but 'next' = {begin} implies "
                                 f"{(begin - self.start) * h * w}")

    def stage1(self, skip_quantile: frozenset[str] | set[str] = frozenset()
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, np.ndarray]]]:
        """One pass: forward, TopQuantile (but for `skip_quantile` layers) and TopImages; merged over ranks."""
        total = len(self.dataset)
        quant = {n: TopQuantile(c, total * h * w, self.config.top_fraction, self.config.interpolation,
                                device=self.device) for n, (c, h, w) in self.shapes.items() if n not in skip_quantile}
        tops = {n: TopImages(c, self.config.top_k, device=self.device) for n, (c, h, w) in self.shapes.items()}
        begin = self._restore("stage1", {"quantiles": quant, "tops": tops})
        keep = begin == self.start and self._keep_decision()
        self.kept = [] if keep else None
        saver = _Saver(self.state, "stage1", self.config)

        def payload(nxt: int) -> dict[str, Any]:
            return {"next": nxt, "quantiles": {n: q.state_dict() for n, q in quant.items()},
                    "tops": {n: t.state_dict() for n, t in tops.items()}}

        bar = progress(total=self.end - self.start, initial=begin - self.start, desc="stage 1: thresholds",
                       unit="img", **self._bar_args())
        for s, batch in self._batches(begin):
            acts = self._forward(batch["image"])
            index = batch["index"].to(self.device, non_blocking=True)
            for n in self.layers:
                if n in quant:
                    quant[n].add(acts[n])
                tops[n].add(index, acts[n])
            if self.kept is not None:
                self.kept.append(acts)
            bar.update(len(index))
            saver.tick(s + len(index), payload)
        bar.close()
        saver.tick(self.end, payload, final=True)  # worth keeping unless stage 1 was quick
        quant = merge_stats(quant, self.ctx)
        tops = merge_stats(tops, self.ctx)
        for n in quant:  # layers tallied at given thresholds have no quantile to be undefined
            self._refuse_nan(n, quant[n], tops[n])
        thresholds = {n: q.result().to(self.device).float() for n, q in quant.items()}  # (U,)
        top_out = {}
        for n, t in tops.items():
            r = t.result()
            top_out[n] = {k: v.detach().cpu().numpy() for k, v in r.items()}
        return thresholds, top_out

    def _refuse_nan(self, name: str, quant: TopQuantile, top: TopImages) -> None:
        """InputError naming the layer, its NaN units and the first image with a NaN there.

        No extra pass: a map with a NaN has a NaN spatial max, which TopImages ranks first, ties
        by image index, so each NaN unit's top image is its first NaN image.
        """
        nan = quant.nan_units()
        if not bool(nan.any()):
            return
        units = torch.nonzero(nan).flatten().tolist()
        where = ""
        scores, indices = top.scores[nan], top.indices[nan]
        first = indices[:, 0][torch.isnan(scores[:, 0])]
        if first.numel():
            index = int(first.min())
            where = f"; the first at image {index} ({self.dataset.meta.records[index].image})"
        shown = ", ".join(map(str, units[:10])) + (f" ... ({len(units)} in all)" if len(units) > 10 else "")
        raise InputError(f"layer {name!r}: activations contained NaN values in unit(s) {shown}{where}; a "
                         f"quantile threshold is undefined (check the model's weights and input normalisation)")

    def stage2(self, thresholds: dict[str, torch.Tensor]
               ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]] | None]:
        """Second pass: upsample, strict threshold and IoU tallies for every layer; merged over ranks.

        Returns (tallies, top images) per layer; the top images (None under --top-images-tiebreak
        index) are ranked by (peak desc, above-threshold area desc, index asc), the area being the
        mask size the tally counts.
        """
        meta = self.dataset.meta
        label_category = torch.as_tensor(np.asarray(_label_category(self.dataset)), dtype=torch.int64,
                                         device=self.device)
        tallies = {n: IoUTally(c, label_category, len(meta.categories), self.config.union, device=self.device)
                   for n, (c, h, w) in self.shapes.items()}
        by_area = self.config.top_images_tiebreak == "area"
        tops = {n: TopImages(c, self.config.top_k, device=self.device, tiebreak="area")
                for n, (c, h, w) in self.shapes.items()} if by_area else {}
        begin = self._restore("stage2", {"tallies": tallies, "tops": tops})
        kept = self.kept if (self.kept is not None and begin == self.start) else None
        # the label-strip pass reads them again: freed there instead (same peak memory, held longer)
        free_here = self.config.label_strips != "on"
        # with the activations in memory, the masks' pixels too when they fit: found once, not three times
        store = self.pixels = (MaskPixelStore(self.spare_bytes, self.config.batch_size,
                                              max(c for c, _, _ in self.shapes.values()))
                               if kept is not None and self.ctx.world_size == 1 else None)
        saver = _Saver(self.state, "stage2", self.config)
        bar = progress(total=self.end - self.start, initial=begin - self.start, desc="stage 2: tally",
                       unit="img", **self._bar_args())
        for i, (s, batch) in enumerate(self._batches(begin)):
            acts = kept[i] if kept is not None else self._forward(batch["image"])
            labels = batch["labels"].to(self.device, non_blocking=True)              # (B, K, sh, sw)
            image_labels = batch["image_labels"].to(self.device, non_blocking=True)  # (B, M)
            b = labels.shape[0]
            prepared = tallies[self.layers[0]].prepare_labels(labels, image_labels)  # shared by all layers
            index = batch["index"].to(self.device, non_blocking=True)
            if store is not None:
                store.begin_batch(i, batch["index"], prepared.size)  # the loader's CPU copy: no device sync
            for n in self.layers:  # sparse: only output windows near a hot source pixel are computed
                to_store = None if store is None else functools.partial(store.add, n, i)
                area = tallies[n].add_activations(acts[n], thresholds[n], prepared, upsample=self.config.upsample,
                                                  on_pixels=to_store)
                if by_area:
                    tops[n].add(index, acts[n], areas=area)
            if kept is not None and free_here:
                kept[i] = {}  # free as we go
            bar.update(b)
            if s + b < self.end:  # after the last batch the results are written right away
                saver.tick(s + b, lambda nxt: {"next": nxt, "tallies": {n: t.state_dict() for n, t in tallies.items()},
                                               "tops": {n: t.state_dict() for n, t in tops.items()}})
        bar.close()
        self.kept = kept if not free_here else None
        if store is not None and store.usable:
            log.info("mask pixels kept between stages: %.1f MiB", store.nbytes / 2 ** 20)
        tallies = merge_stats(tallies, self.ctx)
        out = {}
        for n, t in tallies.items():
            r = t.result()
            out[n] = {k: r[k].detach().cpu().numpy() for k in ("intersection", "activation", "truth")}
        if not by_area:
            return out, None
        tops = merge_stats(tops, self.ctx)
        return out, {n: {k: v.detach().cpu().numpy() for k, v in t.result().items()} for n, t in tops.items()}

    def stage3(self, thresholds: dict[str, torch.Tensor], unit_labels: dict[str, torch.Tensor]
               ) -> dict[str, dict[str, np.ndarray]]:
        """Label-strip pass: per unit, the top_k images by intersection of its mask with its top label.

        Reuses the kept activations when stage 2 left them, else runs a forward. Ties go to the
        smaller image index; slots whose intersection is 0 keep a zero map (they are not shown).
        Returns per layer {indices (U, k'), intersections (U, k') int64, maps (U, k', h, w)}.
        """
        tops = {n: TopImages(c, self.config.top_k, device=self.device, tiebreak="index")
                for n, (c, h, w) in self.shapes.items()}
        begin = self._restore("stage3", {"label_tops": tops})
        kept = self.kept if (self.kept is not None and begin == self.start) else None
        store = self.pixels if (kept is not None and self.pixels is not None and self.pixels.usable) else None
        want = {n: unit_labels[n].to(self.device, torch.int64) for n in self.layers}
        num_labels = len(_label_category(self.dataset))
        saver = _Saver(self.state, "stage3", self.config)
        bar = progress(total=self.end - self.start, initial=begin - self.start, desc="stage 3: label strips",
                       unit="img", **self._bar_args())
        for i, (s, batch) in enumerate(self._batches(begin)):
            acts = kept[i] if kept is not None else self._forward(batch["image"])
            # once per batch for every layer; stage 2 has checked the ids against the label count
            prepared = LabelStripBatch(batch["labels"].to(self.device, non_blocking=True),
                                       batch["image_labels"].to(self.device, non_blocking=True), num_labels)
            index = batch["index"].to(self.device, non_blocking=True)
            for n in self.layers:
                if store is not None:  # the pixels stage 2 found: the same masks, not found again
                    rows, pix = store.pixels(n, i)
                    inter = label_intersections_from_pixels(rows.to(self.device), pix.to(self.device), prepared,
                                                            acts[n].shape[1], want[n])
                else:
                    inter = label_intersections(acts[n], thresholds[n], prepared, None, want[n],
                                                upsample=self.config.upsample)
                # float32 scores are exact for counts below 2**24 (a label image is far smaller)
                tops[n].add(index, acts[n], scores=inter.float())
            if kept is not None:
                kept[i] = {}
            bar.update(len(index))
            if s + len(index) < self.end:
                saver.tick(s + len(index), lambda nxt: {"next": nxt, "label_tops": {n: t.state_dict()
                                                                                     for n, t in tops.items()}})
        bar.close()
        self.kept = self.pixels = None
        tops = merge_stats(tops, self.ctx)
        out = {}
        for n, t in tops.items():
            r = t.result()
            inter = r["scores"].clamp(min=0).to(torch.int64)  # (U, k')
            maps = torch.where((inter > 0)[:, :, None, None], r["maps"], torch.zeros_like(r["maps"]))
            out[n] = {"indices": r["indices"].cpu().numpy(), "intersections": inter.cpu().numpy(),
                      "maps": maps.cpu().numpy()}
        return out


# ---------------------------------------------------------------- labels and groups

def _top_mask_stats(name: str, top: dict[str, np.ndarray], thresholds: torch.Tensor, dataset: Any,
                    config: DissectConfig, store: MaskPixelStore | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per unit (components, spread) of its top images' masks, at each image's label size (dissect.spatial).

    The masks' pixels come from `store` (stage 2's) when it holds them all, else they are found
    from the top maps; the pixels are the same either way.
    """
    maps = torch.from_numpy(np.ascontiguousarray(top["maps"]))  # (U, k, h, w)
    idx = np.asarray(top["indices"])  # (U, k)
    u, k = idx.shape
    comp = np.zeros((u, k), dtype=np.int64)
    spread = np.full((u, k), np.nan)
    area = np.zeros((u, k), dtype=np.int64)
    if idx.size:
        records = dataset.meta.records  # top indices are index.csv rows (batch["index"])
        sizes = {int(i): (int(records[int(i)].sh), int(records[int(i)].sw)) for i in np.unique(idx)}
        size_of = np.array([sizes[int(i)] for i in idx.ravel()]).reshape(u, k, 2)
        kept = None
        if store is not None and set(sizes.values()) == {store.label_size()}:
            kept = store.top_pixels(name, idx, u)
        for size in sorted(set(sizes.values())):  # one pass per label size (Broden has one)
            sel = (size_of == np.array(size)).all(axis=2)  # (U, k)
            if kept is not None:
                which, pix = kept
                pixels = MaskPixels.of(which, pix // size[1], pix % size[1], (u, k, *size))
            else:
                pixels = top_image_pixels(maps, thresholds.cpu(), size, config.upsample)  # the masks as tallied
            stats = pixel_shape_stats(pixels, config.mask_connectivity)
            comp[sel], spread[sel], area[sel] = stats.components[sel], stats.spread[sel], stats.area[sel]
    return MaskStats(comp, spread, area).per_unit()


def _label_layer(name: str, shape: tuple[int, int, int], thresholds: torch.Tensor, top: dict[str, np.ndarray],
                 tally: dict[str, np.ndarray], info: DatasetInfo, config: DissectConfig, model: nn.Module,
                 ckpt_groups: dict[str, dict[str, int]], dataset: Any, pixels: MaskPixelStore | None = None
                 ) -> LayerResult:
    """Labels, detectors, unique detectors, mask compactness and concept groups of one layer."""
    iou = iou_from_counts(tally["intersection"], tally["activation"], tally["truth"], info.label_category)
    sel = info.selected_label_category()
    iou = np.where(sel[None, :] >= 0, iou, 0.0)  # (U, L): labels outside the selected categories drop out
    labels = label_units(iou, sel, info.categories, config.iou_threshold, config.detector_rule)
    counts = layer_label_summary(labels, config.iou_threshold, config.detector_rule, config.unique_rule)
    groups = unit_group = None
    layout = None
    if config.groups is not None:
        layout = equal_groups(shape[0], config.groups, name)
    elif name in ckpt_groups:
        layout = layout_from_spec(ckpt_groups[name], shape[0], name)
    if layout is not None:
        module = dict(model.named_modules()).get(name)
        beta = beta_bn = None
        if isinstance(module, nn.Conv2d):
            beta, beta_bn = group_relevance(module.weight, layout, following_bn(model, name))
        groups = concept_groups(labels, iou, sel, info.label_names, layout, beta, beta_bn,
                                config.group_alpha, config.group_threshold)
        unit_group = group_of_units(layout)
    components, spread = _top_mask_stats(name, top, thresholds, dataset, config, pixels)
    return LayerResult(name=name, shape=shape, thresholds=thresholds.detach().cpu().numpy().astype(np.float32),
                       intersection=tally["intersection"], activation=tally["activation"], truth=tally["truth"],
                       iou=iou, top_indices=top["indices"], top_scores=top["scores"], top_maps=top["maps"],
                       labels=labels, counts=counts, groups=groups, unit_group=unit_group,
                       mask_components=components, mask_spread=spread,
                       spatial=layer_spatial_summary(components, spread, labels.detector))
