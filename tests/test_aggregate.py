"""dissect.aggregate: counts at any threshold from units.json, groups over seeds, paired differences."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from broden.errors import InputError
from dissect.aggregate import (Cell, Paired, cell_text, counts_at, default_group, group_runs, paired_text,
                               read_record)
from results_fixture import CATEGORIES, THRESHOLD, make_dataset, make_results_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("agg")
    dataset = make_dataset(root / "broden", seed=0)
    dirs = []
    for name, base in (("wd", 10), ("cgl", 20)):
        for seed in range(3):
            dirs.append(make_results_dir(root / f"{name}-seed{seed}", seed=base + seed, dataset_root=dataset,
                                         metrics={"val_top1": 0.9 + 0.01 * seed + (0.02 if name == "cgl" else 0)}))
    return dirs


def test_counts_at_the_recorded_threshold_equal_the_summary(runs) -> None:
    for d in runs:
        summary = json.loads((d / "summary.json").read_text())
        for entry in summary["layers"]:
            units = json.loads((d / entry["dir"] / "units.json").read_text())
            got = counts_at(units, THRESHOLD)
            assert got["detectors"] == entry["detectors"]
            assert got["unique_detectors"] == entry["unique_detectors"]


def test_counts_at_another_threshold_by_hand(runs) -> None:
    units = json.loads((runs[0] / "conv1" / "units.json").read_text())
    t = 0.08
    got = counts_at(units, t)
    assert got["detectors"] == sum(u["iou"] >= t for u in units["units"])
    for c in CATEGORIES:
        paper = {u["per_category"][c]["label"] for u in units["units"] if u["per_category"][c]["iou"] > t}
        top = {u["label"] for u in units["units"] if u["iou"] >= t and u["category"] == c}
        assert got["unique_detectors"]["paper"]["per_category"][c] == len(paper)
        assert got["unique_detectors"]["top_label"]["per_category"][c] == len(top)


def test_groups_mean_and_spread_equal_those_of_the_per_seed_numbers(runs) -> None:
    records = [read_record(d, default_group(d.parent)) for d in runs]  # the fixture writes DIR/results
    groups = group_runs(records)
    assert groups.names == ["wd", "cgl"] and groups.seeds("cgl") == [20, 21, 22]
    for name in groups.names:
        per_seed = []
        for r in sorted(groups.runs[name], key=lambda r: r.seed):
            entry = r.layer_meta("conv2")
            per_seed.append(entry["unique_detectors"]["paper"]["total"])
        cell = groups.unique(name, "conv2", "paper", THRESHOLD)
        assert cell.values == per_seed
        assert cell.mean == pytest.approx(statistics.fmean(per_seed))
        assert cell.sd == pytest.approx(statistics.stdev(per_seed))
    acc = groups.metric("cgl", "val_top1")
    assert acc.values == pytest.approx([0.92, 0.93, 0.94])


def test_paired_differences_match_seeds_and_count_signs() -> None:
    a = Cell([0, 1, 2], [5.0, 7.0, 6.0])
    b = Cell([1, 2, 3], [6.0, 6.0, 1.0])
    p = Paired.of(a, b)
    assert p.seeds == [1, 2] and p.diffs == [1.0, 0.0] and p.signs == (1, 1, 0)
    assert paired_text(p) == f"+0.5 ± {statistics.stdev([1.0, 0.0]):.1f} (1+ 1= 0-)"
    assert cell_text(Cell([0], [12.0])) == "12"
    assert cell_text(a) == f"6 ± {statistics.stdev([5.0, 7.0, 6.0]):.1f}"
    assert cell_text(Cell([0, 1], [0.9, 0.95]), percent=True) == "92.5% ± 3.5"


def test_group_names_and_repeated_seeds(runs) -> None:
    assert default_group(Path("out/rbn_lg_ls-seed12")) == "rbn_lg_ls" and default_group(Path("x")) == "x"
    with pytest.raises(InputError, match="already has a run with seed"):
        group_runs([read_record(runs[0], "same"), read_record(runs[0], "same")])
