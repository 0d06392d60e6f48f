"""Compare dissection runs side by side, like the CGL paper's Tables 1-3.

Every number comes from the runs' summary.json files; differences are against
the first run. Output as a GitHub markdown table, a long-form CSV, or a
self-contained HTML page (its figure inline, and also saved as a PNG file).

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
from typing import Any, Mapping, Sequence

from broden.errors import InputError
from dissect.config import RESULT_FIELDS
from broden._fileio import write_text_atomic
from reports.render import template_env
from reports.results import UNIQUE_DEFINITIONS, RunResults, read_run

__all__ = ["Comparison", "Comparability", "compare_runs", "comparability", "comparability_rows",
           "comparison_rows", "format_markdown", "format_csv",
           "render_compare_html", "write_comparison", "FORMATS", "CSV_COLUMNS"]

FORMATS = ("md", "csv", "html")
CSV_COLUMNS = ["table", "run", "layer", "category", "metric", "value", "diff_vs_first"]


@dataclass
class Comparison:
    """Runs to compare, with the union of their layers, categories and recorded metrics."""

    names: list[str]
    runs: list[RunResults]
    definition: str
    layers: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)


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
        values = [run.summary["options"].get(key, _ABSENT) for run in cmp.runs]
        if len({_show(v) for v in values}) > 1:
            options.append((key, values, key in RESULT_FIELDS))
    fps = [run.summary["dataset"].get("fingerprint") for run in cmp.runs]
    present = [{l.name for l in run.layers} for run in cmp.runs]
    missing = [(layer, [n for n, have in zip(cmp.names, present) if layer not in have]) for layer in cmp.layers]
    return Comparability(
        options=options, fingerprints=fps if len(set(fps)) > 1 else [],
        missing_layers=[(layer, lacking) for layer, lacking in missing if lacking],
        last_two=[[l.name for l in run.layers[-2:]] for run in cmp.runs],
        last_two_unavailable=[n for n, run in zip(cmp.names, cmp.runs) if len(run.layers) < 2])


def comparability_notes(cmp: "Comparison") -> list[dict[str, str]]:
    """One {kind, key, text} per reason the runs are not directly comparable."""
    c = comparability(cmp)
    notes = []
    for key, values, changes in c.options:
        effect = "changes results" if changes else "does not change results"
        notes.append({"kind": "option", "key": key, "text": f"option {key} differs ({effect}): " + ", ".join(
            f"{n} = {_show(v)}" for n, v in zip(cmp.names, values))})
    if c.fingerprints:
        notes.append({"kind": "dataset", "key": "fingerprint",
                      "text": "dataset fingerprints differ (the runs saw different data): " + ", ".join(
                          f"{n} = {fp}" for n, fp in zip(cmp.names, c.fingerprints))})
    for layer, lacking in c.missing_layers:
        notes.append({"kind": "layer", "key": layer,
                      "text": f"layer {layer} is missing from {', '.join(lacking)}"})
    for name in c.last_two_unavailable:
        layers = c.last_two[cmp.names.index(name)]
        notes.append({"kind": "rud_last_two", "key": name,
                      "text": f"RUD over the last two layers is not available for {name}: it has "
                              f"{len(layers)} layer(s) ({', '.join(layers) or 'none'})"})
    if c.last_two_differ:
        notes.append({"kind": "rud_last_two", "key": "layers",
                      "text": "RUD over the last two layers covers different layers: " + "; ".join(
                          f"{n} = {', '.join(l)}" for n, l in zip(cmp.names, c.last_two))})
    return notes


def comparability_rows(cmp: "Comparison") -> list[dict[str, Any]]:
    """The CSV rows of table `comparability`: value is text, diff_vs_first empty."""
    c = comparability(cmp)
    cells: list[tuple[str, str, str, Any]] = []  # (run, layer, metric, value)
    for key, values, changes in c.options:
        metric = f"option_differs:{key}" + ("" if changes else " (does not change results)")
        cells += [(n, "", metric, _show(v)) for n, v in zip(cmp.names, values)]
    for n, fp in zip(cmp.names, c.fingerprints):
        cells.append((n, "", "dataset_fingerprint_differs", fp))
    for layer, lacking in c.missing_layers:
        cells += [(n, layer, "layer_missing", "missing") for n in lacking]
    for n, layers in zip(cmp.names, c.last_two):
        cells.append((n, "", "rud_last_two_layers", " ".join(layers)))
    for n in c.last_two_unavailable:
        cells.append((n, "", "rud_last_two_unavailable", "fewer than two layers"))
    return [{"table": "comparability", "run": n, "layer": layer, "category": "", "metric": metric,
             "value": value, "diff_vs_first": None} for n, layer, metric, value in cells]


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
                 definition: str = "paper") -> Comparison:
    """Read every results directory; `names` label the runs (default: directory names)."""
    if len(dirs) < 2:
        raise InputError(f"compare needs at least two results directories, got {len(dirs)}")
    if definition not in UNIQUE_DEFINITIONS:
        raise InputError(f"--definition {definition!r}: expected one of {', '.join(UNIQUE_DEFINITIONS)}")
    paths = [Path(d) for d in dirs]
    if names is None:
        names = _default_names(paths)
    names = [str(n) for n in names]
    if len(names) != len(paths):
        raise InputError(f"--names: {len(names)} name(s) for {len(paths)} results directories; give one per run")
    if len(set(names)) != len(names):
        raise InputError(f"--names: names must differ, got {names}")
    runs = [read_run(p) for p in paths]
    cmp = Comparison(names=names, runs=runs, definition=definition)
    for run in runs:
        cmp.layers += [l.name for l in run.layers if l.name not in cmp.layers]
        cmp.categories += [c for c in run.summary["dataset"].get("categories") or [] if c not in cmp.categories]
        cmp.metrics += [m for m in _flat_metrics(run.summary["model"].get("metrics")) if m not in cmp.metrics]
    return cmp


def _layer_meta(run: RunResults, name: str) -> dict[str, Any] | None:
    return next((l.meta for l in run.layers if l.name == name), None)


def _unique(meta: Mapping[str, Any] | None, definition: str, category: str | None) -> int | None:
    if meta is None:
        return None
    block = meta["unique_detectors"].get(definition) or {}
    if category is None:
        return block.get("total")
    return (block.get("per_category") or {}).get(category, 0)


def comparison_rows(cmp: Comparison) -> list[dict[str, Any]]:
    """Long-form rows (CSV_COLUMNS); `diff_vs_first` is value minus the first run's (None when absent).

    RUD over the last two layers is None for a run with fewer than two layers (not available).
    """
    cells: list[tuple[str, str, str, str, str, Any]] = []  # (table, run, layer, category, metric, value)
    d = cmp.definition
    for name, run in zip(cmp.names, cmp.runs):
        total = 0
        for layer in cmp.layers:
            meta = _layer_meta(run, layer)
            for c in cmp.categories:
                cells.append(("unique_per_category", name, layer, c, f"unique_{d}", _unique(meta, d, c)))
            value = _unique(meta, d, None)
            cells.append(("unique_per_category", name, layer, "", f"unique_{d}", value))
            cells.append(("unique_per_layer", name, layer, "", f"unique_{d}", value))
            total += value or 0
            cells.append(("rud", name, layer, "", f"rud_{d}", None if meta is None else meta["rud"].get(d)))
        cells.append(("unique_per_layer", name, "", "", f"unique_{d}_sum", total))
        last_two = (run.summary.get("rud_last_two") or {}).get(d) if len(run.layers) >= 2 else None
        cells.append(("rud", name, "", "", f"rud_last_two_{d}", last_two))
        metrics = _flat_metrics(run.summary["model"].get("metrics"))
        for m in cmp.metrics:
            cells.append(("metrics", name, "", "", m, metrics.get(m)))
    first = {(c[0], c[2], c[3], c[4]): c[5] for c in cells if c[1] == cmp.names[0]}
    rows = []
    for table, run, layer, cat, metric, value in cells:
        base = first.get((table, layer, cat, metric))
        diff = None if value is None or base is None else value - base
        rows.append({"table": table, "run": run, "layer": layer, "category": cat, "metric": metric,
                     "value": value, "diff_vs_first": diff})
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


def _cell(row: Mapping[str, Any], first: bool) -> str:
    if row.get("note"):
        return str(row["note"])
    text = _fmt(row["value"])
    if not first and row["diff_vs_first"] is not None:
        text += f" ({_fmt_diff(row['diff_vs_first'])})"
    return text or "–"


def _tables(cmp: Comparison) -> list[dict[str, Any]]:
    """The three tables as {title, header, rows: [[cells]], data: [[row dicts]]} for md and html."""
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
    for name, run in zip(cmp.names, cmp.runs):
        t3["rows"].append([name] + [index[("metrics", name, "", "", m)] for m in cmp.metrics]
                          + [index[("rud", name, layer, "", f"rud_{d}")] for layer in cmp.layers]
                          + [_last_two_cell(index[("rud", name, "", "", f"rud_last_two_{d}")], run)])
    return [t1, t2, t3]


def _last_two_cell(row: dict[str, Any], run: RunResults) -> dict[str, Any]:
    if len(run.layers) >= 2:
        return row
    return dict(row, note=f"n/a ({len(run.layers)} layer)")


def _preamble(cmp: Comparison) -> list[str]:
    return [f"Unique detectors counted with the `{cmp.definition}` definition: "
            f"{UNIQUE_DEFINITIONS[cmp.definition]}.",
            f"Differences in parentheses are against the first run ({cmp.names[0]}).",
            "Runs: " + "; ".join(f"{n} = {r.root}" for n, r in zip(cmp.names, cmp.runs)) + "."]


def format_markdown(cmp: Comparison) -> str:
    """The comparability notes, then the three tables, as GitHub markdown."""
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
            cells = [c if isinstance(c, str) else _cell(c, run == cmp.names[0]) for c in row]
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def format_csv(cmp: Comparison) -> str:
    """Long-form CSV, one value per row with its difference against the first run."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in comparison_rows(cmp) + comparability_rows(cmp):
        w.writerow({**r, "value": "" if r["value"] is None else r["value"],
                    "diff_vs_first": "" if r["diff_vs_first"] is None else r["diff_vs_first"]})
    return buf.getvalue()


def render_compare_html(cmp: Comparison, figure_path: str | Path) -> str:
    """A self-contained HTML page: CSS and the figure inline; the figure is also saved at `figure_path`."""
    from reports.figures import compare_bar_chart

    d = cmp.definition
    values = [[_unique(_layer_meta(run, layer), d, None) for layer in cmp.layers] for run in cmp.runs]
    png = compare_bar_chart(cmp.names, cmp.layers, values, figure_path, ylabel=f"unique detectors ({d})")
    env = template_env()
    css = env.loader.get_source(env, "report.css")[0]  # type: ignore[union-attr]
    tables = []
    for t in _tables(cmp):
        rows = [[{"text": c} if isinstance(c, str) else
                 {"text": _cell(c, row[0] == cmp.names[0]), "row": c} for c in row] for row in t["rows"]]
        tables.append(dict(t, rows=rows))
    return env.get_template("compare.html").render(
        title="Dissection runs compared", css=css, preamble=_preamble(cmp), tables=tables,
        notes=comparability_notes(cmp),
        figure="data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii"),
        figure_file=Path(png).name)


def write_comparison(cmp: Comparison, fmt: str, out: str | Path | None) -> str:
    """Render `cmp` as `fmt`; write it atomically to `out` when given. Returns the text.

    The HTML format needs `out`: its figure is saved beside it as <stem>-figures/unique-per-layer.png.
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
