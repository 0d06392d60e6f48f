"""Render a dissection results directory as self-contained HTML pages.

Reports are views over the files `dissect run` wrote (docs/contracts.md,
"Dissection results"): nothing here recomputes a dissection. Pages open from
file:// with no server: CSS, JS, figures and thumbnails are relative files
under DIR/report/.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2

from broden._fileio import write_json_atomic, write_text_atomic
from broden.errors import InputError
from reports.results import (LayerResults, RunResults, detector_rule, is_detector, read_run, safe_name,
                             shown_label)

__all__ = ["render_report", "template_env", "show_value", "normalization_text", "input_size_text",
           "NONE_MEANING"]

log = logging.getLogger(__name__)

def template_env() -> jinja2.Environment:
    """The jinja2 environment over the shipped templates, autoescaping everything."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("reports", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _fmt_num
    env.filters["exact"] = _exact
    env.filters["show"] = show_value
    return env


# What a null option means, in words (summary.json "options"); any other null is "not set".
NONE_MEANING = {
    "categories": "all categories of the dataset", "split": "all splits", "limit": "no limit (every image)",
    "normalize": "the model's own (see Model)", "input_size": "native (images as stored in the dataset)",
    "layers": "the model's default layers", "groups": "the checkpoint's groups, if any",
    "activation_budget_mb": "half the memory free when the run started",
}


def show_value(value: Any, none_text: str = "not set") -> str:
    """A recorded value as a reader wants it: words for None, lists comma-separated, floats shortest."""
    if value is None:
        return none_text
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return repr(value)  # exact: a recorded option must read back as the value used
    if isinstance(value, (list, tuple)):
        return ", ".join(show_value(v) for v in value) if value else "none"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {show_value(v)}" for k, v in value.items()) if value else "none"
    return str(value)


def normalization_text(norm: Any) -> str:
    """`mean [..] · std [..]` (per channel, 0..1 scale) of a recorded normalisation dict; a name as it is."""
    if isinstance(norm, Mapping) and "mean" in norm and "std" in norm:
        def vec(v: Any) -> str:
            items = v if isinstance(v, (list, tuple)) else [v]
            return "[" + ", ".join(f"{float(x):.4g}" for x in items) + "]"
        return f"mean {vec(norm['mean'])} · std {vec(norm['std'])}"
    return show_value(norm, "not recorded")


def input_size_text(summary: Mapping[str, Any]) -> str:
    """The input size the dissection fed the model: the recorded option, else the model's, else native."""
    options, model = summary.get("options") or {}, summary.get("model") or {}
    for where in (options, model):
        size = where.get("input_size")
        if size is not None:
            return f"{size} × {size} px (images resized before the model)"
    return "native (images as stored in the dataset, no resize)"


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _exact(value: Any) -> str:
    """A number written so that parsing it back gives the same float (for data attributes)."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def _copy_static(env: jinja2.Environment, out: Path) -> None:
    for name in ("report.css", "report.js"):
        source = env.loader.get_source(env, name)[0]  # type: ignore[union-attr]
        target = out / name
        if not target.is_file() or target.read_text() != source:
            write_text_atomic(target, source)


def _layer_rows(run: RunResults, categories: list[str]) -> list[dict[str, Any]]:
    rows = []
    for layer in run.layers:
        m = layer.meta
        uniq = m["unique_detectors"]
        rows.append({
            "name": layer.name, "page": safe_name(layer.name) + ".html", "num_units": m["num_units"],
            "shape": m.get("shape"), "detectors": m["detectors"],
            "per_category": {c: {"detectors": m.get("detectors_per_category", {}).get(c, 0),
                                 "paper": uniq.get("paper", {}).get("per_category", {}).get(c, 0),
                                 "top_label": uniq.get("top_label", {}).get("per_category", {}).get(c, 0)}
                             for c in categories},
            "unique_paper": uniq.get("paper", {}).get("total"),
            "unique_top_label": uniq.get("top_label", {}).get("total"),
            "rud_paper": m["rud"].get("paper"), "rud_top_label": m["rud"].get("top_label"),
            "groups": m.get("groups") or [],
        })
    return rows


def _unit_cards(layer: LayerResults, rule: tuple[float, str], strips: Mapping[int, str | None],
                top_k: int, label_strips: Mapping[int, str | None] | None = None) -> list[dict[str, Any]]:
    """One card per unit, sorted by IoU descending (units without an IoU last), ties by unit."""
    label_strips = label_strips or {}
    cards = []
    for u in layer.units["units"]:
        iou = u.get("iou")
        per_cat = sorted(((c, {**v, "label": shown_label(v.get("label"))})
                          for c, v in (u.get("per_category") or {}).items()),
                         key=lambda cv: -(cv[1].get("iou") or 0.0))
        cards.append({
            "unit": int(u["unit"]), "label": shown_label(u.get("label")), "category": u.get("category") or "",
            "iou": iou, "threshold": u.get("threshold"), "group": u.get("group"),
            "detector": iou is not None and is_detector(float(iou), rule),
            "per_category": per_cat, "strip": strips.get(int(u["unit"])),
            "top_images": (u.get("top_images") or [])[:top_k],
            "label_strip": label_strips.get(int(u["unit"])),
            "label_top_images": None if u.get("label_top_images") is None else u["label_top_images"][:top_k],
        })
    cards.sort(key=lambda c: (c["iou"] is None or math.isnan(float(c["iou"])),
                              -float(c["iou"]) if c["iou"] is not None and not math.isnan(float(c["iou"])) else 0.0,
                              c["unit"]))
    return cards


def _definitions(options: Mapping[str, Any], rule: tuple[float, str]) -> dict[str, str]:
    """The unique-detector definitions, worded with the rules this run used."""
    unique_rule = options.get("unique_rule", ">")
    return {"paper": f"per category, distinct best labels among units whose score in that category is "
                     f"{unique_rule} {rule[0]:g}; total = sum over categories (the CGL paper's scripts)",
            "top_label": f"distinct top labels among units whose top label's IoU is {rule[1]} {rule[0]:g} "
                         "(NetDissect-Lite's report header)"}


def _check_request(run: RunResults, top_k: int | None,
                   psi_units: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Validate --top-k and --psi-units against the run before any file is written; k per layer."""
    for name, units in psi_units.items():
        layer = run.layer(name)
        bad = [u for u in units if not 0 <= int(u) < layer.meta["num_units"]]
        if bad:
            raise InputError(f"--psi-units {name}: unit(s) {bad} out of range 0..{layer.meta['num_units'] - 1}")
    layer_k = {}
    for layer in run.layers:
        stored_k = int(layer.units["top_k"])
        layer_k[layer.name] = stored_k if top_k is None else int(top_k)
        if not 1 <= layer_k[layer.name] <= stored_k:
            raise InputError(f"--top-k {top_k}: layer {layer.name} stored {stored_k} top images "
                             f"per unit; choose 1..{stored_k}")
    return layer_k


def render_report(results_dir: str | Path, out_dir: str | Path | None = None, top_k: int | None = None,
                  psi_units: Mapping[str, Sequence[int]] | None = None, *, thumb_height: int = 112,
                  dim: float = 0.2, jpeg_quality: int = 85, psi_p1: float = 1.0, psi_p2: float = 0.0,
                  device: str = "cpu", trust_pickle: bool = False, allow_model_mismatch: bool = False) -> Path:
    """Write DIR/report/index.html and one page per layer; return the index page's path.

    `top_k` images per unit (default: all the run stored); `psi_units` maps a layer name to
    the units whose soft receptive fields (psi heat maps) are drawn, which loads the model.
    `dim` is the brightness kept outside the mask (the reference's 20%). psi maps need the
    model file summary.json fingerprinted, unless `allow_model_mismatch` (reports.psi.check_model_file).
    """
    # Imported here so that reading results (compare) does not pull in matplotlib and torch.
    from reports import figures, thumbnails

    run = read_run(results_dir)
    psi_units = dict(psi_units or {})
    layer_k = _check_request(run, top_k, psi_units)
    if psi_units:
        from reports import psi

        psi.check_model_file(run.summary, allow_model_mismatch)  # before any file is written
    out = Path(out_dir) if out_dir is not None else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    # A failed re-render must not leave an older index that looks complete over newer pages.
    (out / "index.html").unlink(missing_ok=True)
    summary = run.summary
    categories = list(summary["dataset"].get("categories") or [])
    rule = detector_rule(summary["options"])
    env = template_env()
    _copy_static(env, out)

    dataset_root = Path(summary["dataset"]["root"])
    images_dir = dataset_root / "images"
    dataset_note = None if images_dir.is_dir() else (
        f"The dataset images are not available at {images_dir}; top images are not shown. "
        "Restore the dataset at that path and run `dissect report` again.")
    settings = {"top_k": top_k, "thumb_height": thumb_height, "dim": dim, "jpeg_quality": jpeg_quality,
                "detector_threshold": rule[0], "detector_rule": rule[1], "psi_p1": psi_p1, "psi_p2": psi_p2}

    layer_rows = _layer_rows(run, categories)
    has_groups = any(row["groups"] for row in layer_rows)
    bubble = None
    if has_groups:
        bubble_path = figures.group_bubble_plot(
            [(row["name"], row["groups"]) for row in layer_rows], out / "figures" / "concept-groups.png")
        bubble = bubble_path.relative_to(out).as_posix() if bubble_path else None

    psi_figures: dict[str, list[dict[str, Any]]] = {}
    if psi_units:
        # checked above (a mismatch refused or allowed): not hashed twice
        psi_figures = psi.render_psi_figures(run, psi_units, out / "figures", p1=psi_p1, p2=psi_p2,
                                             top_k=top_k, device=device, trust_pickle=trust_pickle,
                                             allow_model_mismatch=True)

    # Masks are drawn at each image's label size, as the dissection thresholds them.
    sizes = thumbnails.label_sizes(dataset_root) if dataset_note is None else {}
    for layer, row in zip(run.layers, layer_rows):
        k = layer_k[layer.name]
        strips: dict[int, str | None] = {}
        label_strips: dict[int, str | None] = {}
        if dataset_note is None:
            strips = thumbnails.unit_strips(layer, dataset_root, out, top_k=k, thumb_height=thumb_height,
                                            dim=dim, quality=jpeg_quality, sizes=sizes)
            label_strips = thumbnails.unit_strips(layer, dataset_root, out, top_k=k, thumb_height=thumb_height,
                                                  dim=dim, quality=jpeg_quality, sizes=sizes, kind="label")
        bar = figures.detectors_bar_chart(layer.units["units"], categories, rule,
                                          out / "figures" / f"{safe_name(layer.name)}-detectors.png",
                                          title=f"{layer.name}: detectors per label")
        cards = _unit_cards(layer, rule, strips, k, label_strips)
        page = env.get_template("layer.html").render(
            title=f"{layer.name} — dissection report", run=summary, layer=row, cards=cards,
            categories=[c for c in categories if any(card["category"] == c for card in cards)],
            bar_chart=bar.relative_to(out).as_posix(), dataset_note=dataset_note,
            psi=[dict(f, src=Path(f["path"]).relative_to(out).as_posix()) for f in psi_figures.get(layer.name, [])],
            top_k=k, settings=settings, all_layers=layer_rows,
            tiebreak=summary["options"].get("top_images_tiebreak", "index"),
            label_strips_on=summary["options"].get("label_strips", "off") == "on")
        write_text_atomic(out / row["page"], page)
        log.info("wrote %s", out / row["page"])

    by_layer = figures.detectors_by_layer_chart([layer.meta for layer in run.layers], categories, rule,
                                                out / "figures" / "detectors-by-layer.png")
    options = [(key, show_value(value, NONE_MEANING.get(key, "not set")), value is None)
               for key, value in sorted(summary["options"].items())]
    index = env.get_template("index.html").render(
        title="Dissection report", run=summary, layers=layer_rows, categories=categories,
        definitions=_definitions(summary["options"], rule), bubble=bubble, has_groups=has_groups, dataset_note=dataset_note,
        settings=settings, options=options, by_layer_chart=by_layer.relative_to(out).as_posix(),
        normalization=normalization_text(summary["model"].get("normalization")),
        input_size=input_size_text(summary),
        rud_last_two=summary.get("rud_last_two") or {},
        metrics=sorted((summary["model"].get("metrics") or {}).items()), all_layers=layer_rows)
    write_json_atomic(out / "report.json", {
        "results": str(run.root.resolve()), "settings": settings,
        "psi_units": {name: [int(u) for u in units] for name, units in psi_units.items()},
        "psi_formulas": {name: {str(f["unit"]): f["formula"] for f in figs} for name, figs in psi_figures.items()},
        "pages": ["index.html"] + [row["page"] for row in layer_rows]})
    index_path = out / "index.html"
    write_text_atomic(index_path, index)  # last: its presence means the report is complete
    log.info("wrote %s", index_path)
    return index_path
