"""HTML views of the Table 1 experiment (cgl_train.experiment): one report per run and the comparison page."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgl_train.experiment import RUN_TITLES, RUNS
from reports.compare import compare_runs, write_comparison
from reports.render import render_report

__all__ = ["ExperimentViews", "render_experiment"]


@dataclass
class ExperimentViews:
    """Where the experiment's HTML went."""

    reports: dict[str, Path] = field(default_factory=dict)  # run -> report/index.html (first seed)
    compare_html: Path | None = None


def render_experiment(result: Any) -> ExperimentViews:
    """Render the first seed's report of every run and the comparison page into result.out."""
    first = min(seed for _, seed in result.dissections)
    views = ExperimentViews()
    for name in RUNS:
        views.reports[name] = render_report(result.dissections[(name, first)])
    cmp = compare_runs([result.dissections[(r, first)] for r in RUNS], names=[RUN_TITLES[r] for r in RUNS])
    views.compare_html = Path(result.out) / "compare.html"
    write_comparison(cmp, "html", views.compare_html)
    return views
