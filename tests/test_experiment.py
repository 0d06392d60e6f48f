"""The synthetic experiment (`dissect demo`) end to end on a tiny preset, with two seeds and the control."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from broden.errors import InputError
from cgl_train.experiment import (CATEGORIES, CONTROL, PAPER_TABLE1, RUN_TITLES, RUNS, TRAINED,
                                  ExperimentOptions, load_config, run_experiment)
from dissect.aggregate import counts_at
from dissect.cli import main


def tiny_config(path: Path) -> Path:
    """The checked-in config with tiny data and narrow layers, so the whole pipeline runs in seconds."""
    cfg = load_config()
    cfg.pop("_source")
    cfg["data"]["quick"] = {"per_class": 1, "size": 32, "seed": 3, "val_fraction": 0.2}
    cfg["train"]["common"].update(arch_kwargs={"width1": 10, "width2": 15}, batch_size=16)
    cfg["train"]["quick"] = {"epochs": 2}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("experiment")
    opts = ExperimentOptions(out=root / "out", config=tiny_config(root / "cfg.json"), quiet=True, device="cpu",
                             seeds=2)
    return run_experiment(opts)


def _summary(experiment, run: str, seed: int) -> dict:
    return json.loads((experiment.out / "dissect" / f"{run}-seed{seed}" / "summary.json").read_text())


def test_every_network_and_the_control_are_dissected_per_seed(experiment) -> None:
    assert set(experiment.dissections) == {(r, s) for r in RUNS for s in (0, 1)}
    for s in (0, 1):
        control = _summary(experiment, CONTROL, s)
        assert control["model"]["train_epoch"] == 0 and control["model"]["metrics"]["untrained"] is True
        trained = _summary(experiment, "weight_decay", s)
        assert trained["model"]["train_epoch"] >= 1 and trained["model"]["train_seed"] == s
    # the control is the weight-decay network before training: same seed, same initial weights
    import torch
    a = torch.load(experiment.out / "runs" / f"{CONTROL}-seed1" / "latest.pth", weights_only=True)
    b = torch.load(experiment.out / "runs" / "weight_decay-seed1" / "latest.pth", weights_only=True)
    assert a["seed"] == b["seed"] == 1 and a["train_options"]["lambda_bn"] == b["train_options"]["lambda_bn"]
    assert [row["run"] for row in experiment.convergence] == list(TRAINED) * 2


def test_cells_are_mean_and_sd_of_the_per_seed_numbers(experiment) -> None:
    saved = json.loads(experiment.table_json.read_text())
    tables = {t["id"]: t for t in saved["tables"]}
    assert set(tables) >= {"unique-paper-0.04", "unique-paper-0.08", "unique-top_label-0.04",
                           "unique-top_label-0.08", "spatial"}
    for definition in ("paper", "top_label"):
        for threshold in (0.04, 0.08):
            table = tables[f"unique-{definition}-{threshold:g}"]
            groups_seen = set()
            for row in table["rows"]:
                group, layer = row[0]["group"], row[1]["layer"]
                groups_seen.add(group)
                run = next(r for r, t in RUN_TITLES.items() if t == group)
                total = row[2 + len(CATEGORIES)]
                per_seed = []
                for s in (0, 1):
                    units = json.loads((experiment.out / "dissect" / f"{run}-seed{s}" / layer / "units.json")
                                       .read_text())
                    per_seed.append(counts_at(units, threshold)["unique_detectors"][definition]["total"])
                    if threshold == 0.04:  # the dissection's own threshold: summary.json's numbers
                        meta = next(l for l in _summary(experiment, run, s)["layers"] if l["name"] == layer)
                        assert per_seed[-1] == meta["unique_detectors"][definition]["total"]
                assert total["per_seed"] == {"0": per_seed[0], "1": per_seed[1]}
                assert total["mean"] == pytest.approx(statistics.fmean(per_seed))
                assert total["sd"] == pytest.approx(statistics.stdev(per_seed))
                if (run, layer) in PAPER_TABLE1:
                    assert total["paper"] == PAPER_TABLE1[(run, layer)][3]
                paired = row[-1]
                if run == "weight_decay":
                    assert "per_seed" not in paired  # the baseline
                else:
                    base = tables[f"unique-{definition}-{threshold:g}"]
                    wd = next(r for r in base["rows"] if r[0]["group"] == RUN_TITLES["weight_decay"]
                              and r[1]["layer"] == layer)[2 + len(CATEGORIES)]["per_seed"]
                    assert paired["per_seed"] == {s: total["per_seed"][s] - wd[s] for s in ("0", "1")}
            assert groups_seen == {RUN_TITLES[r] for r in RUNS}


def test_markdown_shows_the_control_row_and_ours_beside_the_paper(experiment) -> None:
    text = experiment.table_md.read_text()
    assert "Random init (untrained)" in text and "### Training" in text
    lines = [l for l in text.split("### Unique detectors (paper definition, IoU threshold 0.04)")[1]
             .split("###")[0].splitlines() if l.startswith("| R_bn + L_g + L_s | conv2 |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[2].endswith(f"/ {PAPER_TABLE1[('rbn_lg_ls', 'conv2')][0]}")
    assert cells[5].endswith(f"/ {PAPER_TABLE1[('rbn_lg_ls', 'conv2')][3]}")
    assert "±" in cells[5]  # two seeds: mean ± sd
    assert "(baseline)" in text


def test_reports_and_comparison_page_exist(experiment) -> None:
    from reports.experiment import render_experiment

    views = render_experiment(experiment)
    assert set(views.reports) == set(RUNS)
    for path in views.reports.values():
        assert path.name == "index.html" and path.is_file()
    html = views.compare_html.read_text()
    assert "R_bn + L_g + L_s" in html and "Random init (untrained)" in html
    assert "http://" not in html and "https://" not in html and "`" not in html
    assert "±" in html and "IoU threshold 0.08" in html
    assert (experiment.out / "compare-figures" / "iou-distributions.png").is_file()


def test_rerun_reuses_training_and_dissection(experiment) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in (experiment.out / "runs").glob("*/latest.pth")}
    stamps.update({p: p.stat().st_mtime_ns for p in (experiment.out / "dissect").glob("*/summary.json")})
    opts = ExperimentOptions(out=experiment.out, config=experiment.out.parent / "cfg.json", quiet=True,
                             device="cpu", report=False, seeds=2)
    again = run_experiment(opts)
    assert [t.to_dict() for t in again.tables] == [t.to_dict() for t in experiment.tables]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_run_trained_with_other_options_is_not_reused(experiment, tmp_path: Path) -> None:
    cfg = json.loads((experiment.out.parent / "cfg.json").read_text())
    cfg["runs"]["weight_decay"]["weight_decay"] = 0.5  # the baseline (and its control) changed
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(cfg))
    stamps = {p: p.stat().st_mtime_ns for p in (experiment.out / "runs").glob("*/latest.pth")}
    opts = ExperimentOptions(out=experiment.out, config=changed, quiet=True, device="cpu", report=False, seeds=2)
    with pytest.raises(InputError, match=r"random_init-seed0.*weight_decay: 0\.0001 here, 0\.5 now.*new --out"):
        run_experiment(opts)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained or overwritten


def test_precision_is_recorded_beside_amp(experiment) -> None:
    from cgl_train.engine import amp_dtype_for
    import torch

    ckpt = torch.load(experiment.out / "runs" / "weight_decay-seed0" / "latest.pth", weights_only=True)
    dtype = amp_dtype_for(torch.device("cpu")) if ckpt["train_options"]["amp"] else None
    assert ckpt["precision"] == (str(dtype).removeprefix("torch.") if dtype is not None else "float32")
    header = json.loads((experiment.out / "runs" / "weight_decay-seed0" / "log.jsonl").read_text().splitlines()[0])
    assert header["precision"] == ckpt["precision"]


def test_bad_config_and_options_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {}, "train": {}, "runs": {"weight_decay": {}}, "dissect": {}}))
    with pytest.raises(InputError, match="rbn"):
        load_config(bad)
    assert main(["demo", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert main(["demo", "--out", str(tmp_path / "o"), "--seeds", "0"]) == 2



def test_step_clock_counts_k_of_n_and_estimates_each_kind_from_its_finished_steps() -> None:
    from cgl_train.experiment import StepClock

    now = [0.0]
    steps = StepClock(["saving", "dissecting", "training", "dissecting", "training"], clock=lambda: now[0])
    assert steps.start("saving A") == "[run 1/5] saving A ... ETA unknown"
    now[0] = 1.0  # a save: no estimate of a training or a dissection yet
    assert steps.start("dissecting A") == "[run 2/5] dissecting A ... ETA unknown"
    now[0] = 61.0  # a dissection took 1 min; no training has finished
    assert steps.start("training B") == "[run 3/5] training B ... ETA unknown"
    now[0] = 361.0  # a training took 5 min: left this dissection (1 min) and a training (5 min)
    assert steps.start("dissecting B") == "[run 4/5] dissecting B ... ETA ~6 min"
    now[0] = 481.0  # dissections now average 90 s: left one training, 5 min
    assert steps.start("training C") == "[run 5/5] training C ... ETA ~5 min"
    with pytest.raises(InputError, match="past the plan's 5"):
        steps.start("one more")
    steps = StepClock(["a", "a"], clock=lambda: now[0])
    steps.start("a")
    now[0] += 5.0
    assert steps.start("a") == "[run 2/2] a ... ETA <1 min"


def test_demo_announces_every_training_and_dissection_as_run_k_of_n(experiment, caplog) -> None:
    import logging

    opts = ExperimentOptions(out=experiment.out, config=experiment.out.parent / "cfg.json", quiet=True,
                             device="cpu", report=False, seeds=2)
    with caplog.at_level(logging.INFO, logger="cgl_train.experiment"):
        run_experiment(opts)  # every step is reused: quick, and still announced
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[run ")]
    n = 2 * len(RUNS) * 2  # (a training or the control's save, then a dissection) per run and seed
    assert len(lines) == n
    expected = []
    for seed in (0, 1):
        for run in RUNS:
            expected += [f"{'saving' if run == CONTROL else 'training'} {RUN_TITLES[run]} (seed {seed})",
                         f"dissecting {RUN_TITLES[run]} (seed {seed})"]
    for k, (line, what) in enumerate(zip(lines, expected), start=1):
        assert line.startswith(f"[run {k}/{n}] {what} ... ETA ")
    # unknown until a save, a dissection and a training have each finished once
    assert all(line.endswith("ETA unknown") for line in lines[:3])
    assert all("unknown" not in line for line in lines[3:])
