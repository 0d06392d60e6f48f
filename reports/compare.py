"""Compare dissection runs side by side, like the CGL paper's Tables 1-3.

Runs are grouped by name: runs that share a name (`--names`, or directory names without a
`-seedN` suffix) are seeds of one configuration, and a cell shows the mean ± sample standard
deviation over them; differences against the baseline group (the first, or `--baseline`) are
per-seed paired differences with their sign count. Every number comes from the runs' files
(summary.json, units.json; dissect.aggregate recounts detectors at other IoU thresholds). Output
as GitHub markdown, a long-form CSV, or a self-contained HTML page (figures inline, and also
saved as PNG files).

Every output also says where the runs are not comparable: recorded options
that differ (marked when dissect.config.RESULT_FIELDS says they change
results), differing dataset fingerprints, layers some runs lack, and RUD over
"the last two layers" when a run has fewer than two layers (not available) or
when the runs' last two layers differ. In the CSV these are rows of the table
`comparability`, with a text value.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from broden._fileio import write_text_atomic
from broden.errors import InputError
from dissect.aggregate import (DEFAULT_THRESHOLDS, DEFINITIONS, Cell, Groups, Paired, RunRecord, Table,
                               default_group, group_runs, markdown, read_record, run_seed, spatial_table,
                               threshold_table)
from dissect.config import RESULT_FIELDS
from reports.render import template_env
from reports.results import UNIQUE_DEFINITIONS, RunResults, read_run

__all__ = ["Comparison", "Comparability", "compare_runs", "comparability", "comparability_rows",
           "comparison_rows", "threshold_tables", "threshold_rows", "format_markdown", "format_csv",
           "render_compare_html", "write_comparison", "FORMATS", "CSV_COLUMNS", "DEFAULT_THRESHOLDS"]

FORMATS = ("md", "csv", "html")
CSV_COLUMNS = ["table", "run", "layer", "category", "metric", "value", "diff_vs_first", "sd", "n", "seeds"]


@dataclass
class Comparison:
    """Runs to compare, grouped by configuration, with the union of their layers, categories and metrics."""

    names: list[str]                 # group names, in first-seen order
    runs: list[RunResults]           # every run, in the order given
    run_groups: list[str]            # each run's group
    groups: Groups                   # dissect.aggregate's view of the same runs
    definition: str
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    baseline: str = ""               # the group differences are against
    reference: dict[tuple[str, str], dict[str, int]] | None = None  # published numbers per (group, layer)
    reference_name: str = "paper"
    layers: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    @property
    def run_labels(self) -> list[str]:
        """A label per run: its group, with its seed when the group has several runs."""
        sizes = {g: self.run_groups.count(g) for g in self.names}
        return [g if sizes[g] == 1 else f"{g} (seed {run_seed(r.summary)})" for g, r in zip(self.run_groups, self.runs)]

    @property
    def seeded(self) -> bool:
        """True when some group holds several runs (seeds)."""
        return len(self.run_groups) > len(self.names)


@dataclass
class Comparability:
    """What makes the runs of a Comparison differ beyond the model (empty lists: fully comparable)."""

    options: list[tuple[str, list[Any], bool]]  # (option, value per run or _ABSENT, changes results)
    fingerprints: list[str | None]              # dataset fingerprint per run; [] when all equal
    missing_layers: list[tuple[str, list[str]]]  # (layer, names of the runs without it)
    last_two: list[list[str]]                   # per run: the layers its RUD over the last two layers covers
    last_two_unavailable: list[str]             # names of runs with fewer than two layers

    @property
    def last_two_differ(self) -> bool:
        """Whether RUD over "the last two layers" means different layers in different runs."""
        return len({tuple(x) for x in self.last_two}) > 1

    def ok(self) -> bool:
        """True when nothing but the model differs."""
        return not (self.options or self.fingerprints or self.missing_layers or self.last_two_unavailable
                    or self.last_two_differ)


_ABSENT = "(not recorded)"


def _show(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value, sort_keys=True)


def comparability(cmp: "Comparison") -> Comparability:
    """Options, dataset fingerprints and layers that differ between the runs of `cmp`."""
    options: list[tuple[str, list[Any], bool]] = []
    keys: list[str] = []
    for run in cmp.runs:
        keys += [k for k in run.summary["options"] if k not in keys]
    for key in keys:
        if key == "seed" and cmp.seeded:
            continue  # seeds of one configuration differ by design; the tables say which
        values = [run.summary["options"].get(key, _ABSENT) for run in cmp.runs]
        if len({_show(v) for v in values}) > 1:
            options.append((key, values, key in RESULT_FIELDS))
    fps = [run.summary["dataset"].get("fingerprint") for run in cmp.runs]
    present = [{l.name for l in run.layers} for run in cmp.runs]
    labels = cmp.run_labels
    missing = [(layer, [n for n, have in zip(labels, present) if layer not in have]) for layer in cmp.layers]
    return Comparability(
        options=options, fingerprints=fps if len(set(fps)) > 1 else [],
        missing_layers=[(layer, lacking) for layer, lacking in missing if lacking],
        last_two=[[l.name for l in run.layers[-2:]] for run in cmp.runs],
        last_two_unavailable=[n for n, run in zip(labels, cmp.runs) if len(run.layers) < 2])


def comparability_notes(cmp: "Comparison") -> list[dict[str, str]]:
    """One {kind, key, text} per reason the runs are not directly comparable."""
    c = comparability(cmp)
    notes = []
    for key, values, changes in c.options:
        effect = "changes results" if changes else "does not change results"
        notes.append({"kind": "option", "key": key, "text": f"option {key} differs ({effect}): " + ", ".join(
            f"{n} = {_show(v)}" for n, v in zip(cmp.run_labels, values))})
    if c.fingerprints:
        notes.append({"kind": "dataset", "key": "fingerprint",
                      "text": "dataset fingerprints differ (the runs saw different data): " + ", ".join(
                          f"{n} = {fp}" for n, fp in zip(cmp.run_labels, c.fingerprints))})
    for layer, lacking in c.missing_layers:
        notes.append({"kind": "layer", "key": layer,
                      "text": f"layer {layer} is missing from {', '.join(lacking)}"})
    for name in c.last_two_unavailable:
        layers = c.last_two[cmp.run_labels.index(name)]
        notes.append({"kind": "rud_last_two", "key": name,
                      "text": f"RUD over the last two layers is not available for {name}: it has "
                              f"{len(layers)} layer(s) ({', '.join(layers) or 'none'})"})
    if c.last_two_differ:
        notes.append({"kind": "rud_last_two", "key": "layers",
                      "text": "RUD over the last two layers covers different layers: " + "; ".join(
                          f"{n} = {', '.join(l)}" for n, l in zip(cmp.run_labels, c.last_two))})
    return notes


def comparability_rows(cmp: "Comparison") -> list[dict[str, Any]]:
    """The CSV rows of table `comparability`: value is text, diff_vs_first empty."""
    c = comparability(cmp)
    cells: list[tuple[str, str, str, Any]] = []  # (run, layer, metric, value)
    for key, values, changes in c.options:
        metric = f"option_differs:{key}" + ("" if changes else " (does not change results)")
        cells += [(n, "", metric, _show(v)) for n, v in zip(cmp.run_labels, values)]
    for n, fp in zip(cmp.run_labels, c.fingerprints):
        cells.append((n, "", "dataset_fingerprint_differs", fp))
    for layer, lacking in c.missing_layers:
        cells += [(n, layer, "layer_missing", "missing") for n in lacking]
    for n, layers in zip(cmp.run_labels, c.last_two):
        cells.append((n, "", "rud_last_two_layers", " ".join(layers)))
    for n in c.last_two_unavailable:
        cells.append((n, "", "rud_last_two_unavailable", "fewer than two layers"))
    return [{"table": "comparability", "run": n, "layer": layer, "category": "", "metric": metric,
             "value": value, "diff_vs_first": None, "sd": None, "n": None, "seeds": ""}
            for n, layer, metric, value in cells]


def _flat_metrics(metrics: Mapping[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """Numeric metrics, nested dicts flattened with dots (e.g. val.top1)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _default_names(dirs: Sequence[Path]) -> list[str]:
    # The shortest tail of each path (1 or 2 components) that tells the runs apart.
    for depth in (1, 2):
        names = ["/".join(d.resolve().parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i + 1})" for i, n in enumerate(names)]


def compare_runs(dirs: Sequence[str | Path], names: Sequence[str] | None = None,
                 definition: str = "paper", thresholds: Sequence[float] | None = None,
                 baseline: str | None = None, reference: Mapping[tuple[str, str], Mapping[str, int]] | None = None,
                 reference_name: str = "paper") -> Comparison:
    """Read every results directory; `names` label the runs (repeats: seeds of one group).

    Default names: the directory names (or their last two path parts, where needed to tell them
    apart) without a trailing `-seedN`. `baseline` names the group differences are against
    (default: the first); `reference` gives published numbers per (group, layer).
    """
    if len(dirs) < 2:
        raise InputError(f"compare needs at least two results directories, got {len(dirs)}")
    if definition not in UNIQUE_DEFINITIONS:
        raise InputError(f"--definition {definition!r}: expected one of {', '.join(UNIQUE_DEFINITIONS)}")
    paths = [Path(d) for d in dirs]
    if names is None:
        names = [default_group(n) for n in _default_names(paths)]
    names = [str(n) for n in names]
    if len(names) != len(paths):
        raise InputError(f"--names: {len(names)} name(s) for {len(paths)} results directories; give one per run "
                         f"(repeat a name for the seeds of one configuration)")
    thresholds = list(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    for t in thresholds:
        if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise InputError(f"--iou-thresholds {t!r}: expected numbers in [0, 1]")
    runs = [read_run(p) for p in paths]
    groups = group_runs([read_record(p, n) for p, n in zip(paths, names)])
    baseline = groups.names[0] if baseline is None else baseline
    if baseline not in groups.names:
        raise InputError(f"--baseline {baseline!r}: not a run name; names: {', '.join(groups.names)}")
    cmp = Comparison(names=list(groups.names), runs=runs, run_groups=names, groups=groups, definition=definition,
                     thresholds=thresholds, baseline=baseline,
                     reference={k: dict(v) for k, v in reference.items()} if reference else None,
                     reference_name=reference_name)
    for run in runs:
        cmp.layers += [l.name for l in run.layers if l.name not in cmp.layers]
        cmp.categories += [c for c in run.summary["dataset"].get("categories") or [] if c not in cmp.categories]
        cmp.metrics += [m for m in _flat_metrics(run.summary["model"].get("metrics")) if m not in cmp.metrics]
    return cmp


def _unique(meta: Mapping[str, Any] | None, definition: str, category: str | None) -> int | None:
    if meta is None:
        return None
    block = meta["unique_detectors"].get(definition) or {}
    if category is None:
        return block.get("total")
    return (block.get("per_category") or {}).get(category, 0)


def _group_cells(cmp: Comparison) -> list[tuple[str, str, str, str, str, Callable[[RunRecord], Any]]]:
    """(table, group, layer, category, metric, value of a run) for every cell of tables 1-3."""
    d = cmp.definition
    cells: list[tuple[str, str, str, str, str, Callable[[RunRecord], Any]]] = []
    for g in cmp.names:
        for layer in cmp.layers:
            for c in cmp.categories + [""]:
                cells.append(("unique_per_category", g, layer, c, f"unique_{d}",
                              lambda r, l=layer, c=c: _unique(r.layer_meta(l), d, c or None)))
            cells.append(("unique_per_layer", g, layer, "", f"unique_{d}",
                          lambda r, l=layer: _unique(r.layer_meta(l), d, None)))
            cells.append(("rud", g, layer, "", f"rud_{d}",
                          lambda r, l=layer: None if r.layer_meta(l) is None else r.layer_meta(l)["rud"].get(d)))
        cells.append(("unique_per_layer", g, "", "", f"unique_{d}_sum",
                      lambda r: sum(_unique(r.layer_meta(l), d, None) or 0 for l in cmp.layers)))
        cells.append(("rud", g, "", "", f"rud_last_two_{d}",
                      lambda r: (r.summary.get("rud_last_two") or {}).get(d) if len(r.summary["layers"]) >= 2
                      else None))
        for m in cmp.metrics:
            cells.append(("metrics", g, "", "", m, lambda r, m=m: _flat_metrics(r.summary["model"].get("metrics")).get(m)))
    return cells


def _value(cell: Cell) -> Any:
    """One run: its own number (an int stays an int); several: the mean; none: None."""
    if cell.n == 0:
        return None
    if cell.n == 1:
        v = cell.values[0]
        return int(v) if float(v).is_integer() and not isinstance(v, bool) else v
    return cell.mean


def comparison_rows(cmp: Comparison) -> list[dict[str, Any]]:
    """Long-form rows (CSV_COLUMNS), one per group and number.

    `value` is the run's number, or the mean over the group's seeds (`sd`, `n` and `seeds` say
    over what); `diff_vs_first` is the value minus the baseline group's, paired by seed when the
    groups have seeds (None when absent). RUD over the last two layers is None for a run with
    fewer than two layers (not available).
    """
    cells = _group_cells(cmp)
    cell_of: dict[tuple[str, str, str, str, str], Cell] = {}
    for table, g, layer, cat, metric, fn in cells:
        cell_of[(table, g, layer, cat, metric)] = cmp.groups.cell(g, fn)
    rows = []
    for (table, g, layer, cat, metric), cell in cell_of.items():
        base = cell_of.get((table, cmp.baseline, layer, cat, metric))
        diff = None
        if base is not None and cell.n and base.n:
            if cell.n == 1 and base.n == 1:
                diff = _value(cell) - _value(base)
            else:
                pairs = Paired.of(cell, base)
                diff = pairs.mean if pairs.diffs else None
        rows.append({"table": table, "run": g, "layer": layer, "category": cat, "metric": metric,
                     "value": _value(cell), "diff_vs_first": diff, "sd": cell.sd if cell.n > 1 else None,
                     "n": cell.n, "seeds": " ".join(str(s) for s in cell.seeds)})
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def _fmt_diff(diff: Any) -> str:
    if diff is None:
        return ""
    if isinstance(diff, float):
        return f"{diff:+.3f}"
    return f"{diff:+d}"


def _cell(row: Mapping[str, Any], baseline: bool) -> str:
    if row.get("note"):
        return str(row["note"])
    text = _fmt(row["value"])
    if row.get("sd") is not None:
        text += f" ± {_fmt(row['sd'])}"
    if not baseline and row["diff_vs_first"] is not None:
        text += f" ({_fmt_diff(row['diff_vs_first'])})"
    return text or "–"


def _tables(cmp: Comparison) -> list[dict[str, Any]]:
    """Tables 1-3 as {id, title, header, rows: [[cells]]} for md and html (cells: str or row dicts)."""
    rows = comparison_rows(cmp)
    d = cmp.definition
    index = {(r["table"], r["run"], r["layer"], r["category"], r["metric"]): r for r in rows}
    t1 = {"id": "unique_per_category", "title": f"Unique detectors per layer and category ({d}; CGL Table 1)",
          "header": ["run", "layer"] + cmp.categories + ["total"], "rows": []}
    for name in cmp.names:
        for layer in cmp.layers:
            t1["rows"].append([name, layer] + [index[("unique_per_category", name, layer, c, f"unique_{d}")]
                                               for c in cmp.categories + [""]])
    t2 = {"id": "unique_per_layer", "title": f"Unique detectors per layer ({d}; CGL Table 2)",
          "header": ["run"] + cmp.layers + ["sum"], "rows": []}
    for name in cmp.names:
        t2["rows"].append([name] + [index[("unique_per_layer", name, layer, "", f"unique_{d}")]
                                    for layer in cmp.layers]
                          + [index[("unique_per_layer", name, "", "", f"unique_{d}_sum")]])
    t3 = {"id": "rud", "title": f"Accuracy and RUD ({d}; CGL Table 3)",
          "header": ["run"] + cmp.metrics + [f"RUD {layer}" for layer in cmp.layers] + ["RUD last two layers"],
          "rows": []}
    for name in cmp.names:
        t3["rows"].append([name] + [index[("metrics", name, "", "", m)] for m in cmp.metrics]
                          + [index[("rud", name, layer, "", f"rud_{d}")] for layer in cmp.layers]
                          + [_last_two_cell(index[("rud", name, "", "", f"rud_last_two_{d}")], cmp, name)])
    return [t1, t2, t3]


def _last_two_cell(row: dict[str, Any], cmp: Comparison, group: str) -> dict[str, Any]:
    short = [len(r.summary["layers"]) for r in cmp.groups.runs[group] if len(r.summary["layers"]) < 2]
    if not short:
        return row
    return dict(row, note=f"n/a ({short[0]} layer)")


def threshold_tables(cmp: Comparison) -> list[Table]:
    """Detectors and unique detectors under both definitions at every IoU threshold (dissect.aggregate)."""
    return [threshold_table(cmp.groups, d, t, baseline=cmp.baseline, reference=cmp.reference,
                            reference_name=cmp.reference_name)
            for d in DEFINITIONS for t in cmp.thresholds]


def _preamble(cmp: Comparison) -> list[str]:
    lines = [f"Unique detectors counted with the `{cmp.definition}` definition: "
             f"{UNIQUE_DEFINITIONS[cmp.definition]}.",
             f"Differences in parentheses are against {cmp.baseline}"
             + (", paired by seed." if cmp.seeded else "."),
             "Runs: " + "; ".join(f"{n} = {r.root}" for n, r in zip(cmp.run_labels, cmp.runs)) + "."]
    if cmp.seeded:
        lines.append("Seeds: " + "; ".join(f"{g}: {', '.join(map(str, cmp.groups.seeds(g)))}" for g in cmp.names)
                     + ". A cell over several seeds is mean ± sample standard deviation.")
    return lines


def format_markdown(cmp: Comparison) -> str:
    """The comparability notes, tables 1-3, then the threshold and mask tables, as GitHub markdown."""
    lines = ["# Dissection runs compared", ""] + [line + "  " for line in _preamble(cmp)] + [""]
    notes = comparability_notes(cmp)
    lines += ["## Comparability", ""]
    if notes:
        lines += ["The runs differ in more than the model:", ""] + [f"- {n['text']}" for n in notes] + [""]
    else:
        lines += ["The runs agree on every recorded option, the dataset and the layers.", ""]
    for t in _tables(cmp):
        lines += [f"## {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
                  "|" + "|".join("---" for _ in t["header"]) + "|"]
        for row in t["rows"]:
            run = row[0]
            cells = [c if isinstance(c, str) else _cell(c, run == cmp.baseline) for c in row]
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
        lines.append("")
    lines += ["## Detectors and unique detectors at each IoU threshold", ""]
    lines += [markdown(t) for t in threshold_tables(cmp)]
    lines += ["## Mask compactness", "", markdown(spatial_table(cmp.groups))]
    return "\n".join(lines)


def format_csv(cmp: Comparison) -> str:
    """Long-form CSV, one value per row with its difference against the baseline group."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in comparison_rows(cmp) + threshold_rows(cmp) + comparability_rows(cmp):
        w.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})
    return buf.getvalue()


def threshold_rows(cmp: Comparison) -> list[dict[str, Any]]:
    """CSV rows of the threshold tables: table `unique-<definition>-<t>`, value = mean over seeds."""
    rows = []
    for t in threshold_tables(cmp):
        for row in t.rows:
            for _, data in row[2:]:
                if "mean" not in data or data.get("metric") in (None, "val_top1"):
                    continue
                rows.append({"table": t.id, "run": data["group"], "layer": data.get("layer", ""),
                             "category": data.get("category", ""), "metric": data["metric"],
                             "value": data["mean"], "diff_vs_first": None, "sd": data.get("sd"),
                             "n": data.get("n"), "seeds": " ".join(data.get("per_seed", {}))})
    return rows


def render_compare_html(cmp: Comparison, figure_path: str | Path) -> str:
    """A self-contained HTML page: CSS and the figures inline; the figures are also saved beside `figure_path`."""
    from reports.figures import compare_bar_chart, iou_distributions

    d = cmp.definition
    means = [[cmp.groups.cell(g, lambda r, l=layer: _unique(r.layer_meta(l), d, None)) for layer in cmp.layers]
             for g in cmp.names]
    png = compare_bar_chart(cmp.names, cmp.layers, [[_value(c) for c in row] for row in means], figure_path,
                            ylabel=f"unique detectors ({d})",
                            errors=[[c.sd if c.n > 1 else None for c in row] for row in means])
    dist = iou_distributions({g: {layer: cmp.groups.top_ious(g, layer) for layer in cmp.layers} for g in cmp.names},
                             cmp.layers, Path(figure_path).parent / "iou-distributions.png", cmp.thresholds)
    env = template_env()
    css = env.loader.get_source(env, "report.css")[0]  # type: ignore[union-attr]
    tables = []
    for t in _tables(cmp):
        rows = [[{"text": c} if isinstance(c, str) else
                 {"text": _cell(c, row[0] == cmp.baseline), "row": c} for c in row] for row in t["rows"]]
        tables.append(dict(t, rows=rows))
    extra = [{"id": t.id, "title": t.title, "header": t.header, "notes": t.notes,
              "rows": [[{"text": text, "data": data} for text, data in row] for row in t.rows]}
             for t in threshold_tables(cmp) + [spatial_table(cmp.groups)]]

    def inline(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")

    return env.get_template("compare.html").render(
        # markdown's `code` marks mean nothing in HTML: the page shows the words
        title="Dissection runs compared", css=css, preamble=[line.replace("`", "") for line in _preamble(cmp)],
        tables=tables, extra=extra,
        notes=comparability_notes(cmp), figure=inline(png), figure_file=Path(png).name,
        dist_figure=inline(dist), dist_file=Path(dist).name)


def write_comparison(cmp: Comparison, fmt: str, out: str | Path | None) -> str:
    """Render `cmp` as `fmt`; write it atomically to `out` when given. Returns the text.

    The HTML format needs `out`: its figures are saved beside it under <stem>-figures/.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "html":
        if out is None:
            raise InputError("--format html needs --out FILE (its figure is saved beside the page)")
        out = Path(out)
        text = render_compare_html(cmp, out.parent / f"{out.stem}-figures" / "unique-per-layer.png")
    elif fmt == "csv":
        text = format_csv(cmp)
    else:
        text = format_markdown(cmp)
    if out is not None:
        write_text_atomic(out, text)
    return text
