"""HTML views of the Table 1 experiment (cgl_train.experiment): one report per network and the comparison page."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgl_train.experiment import BASELINE, RUN_TITLES, RUNS, paper_reference
from reports.compare import compare_runs, write_comparison
from reports.render import render_report

__all__ = ["ExperimentViews", "render_experiment"]


@dataclass
class ExperimentViews:
    """Where the experiment's HTML went."""

    reports: dict[str, Path] = field(default_factory=dict)  # run -> report/index.html (first seed)
    compare_html: Path | None = None


def render_experiment(result: Any) -> ExperimentViews:
    """Render the first seed's report of every network, and the comparison page over every seed.

    The page groups the dissections by network, as table1.md does, with the same tables
    (dissect.aggregate.threshold_table); differences are against weight decay, paired by seed.
    """
    first = min(seed for _, seed in result.dissections)
    views = ExperimentViews()
    for name in RUNS:
        views.reports[name] = render_report(result.dissections[(name, first)])
    keys = sorted(result.dissections, key=lambda k: (RUNS.index(k[0]), k[1]))
    cmp = compare_runs([result.dissections[k] for k in keys], names=[RUN_TITLES[r] for r, _ in keys],
                       thresholds=result.thresholds, baseline=RUN_TITLES[BASELINE], reference=paper_reference())
    views.compare_html = Path(result.out) / "compare.html"
    write_comparison(cmp, "html", views.compare_html)
    return views
