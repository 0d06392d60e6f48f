"""The synthetic experiment (`dissect demo`) end to end on a tiny preset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from broden.errors import InputError
from dissect.cli import main
from cgl_train.experiment import (CATEGORIES, LAYERS, PAPER_TABLE1, RUNS, ExperimentOptions, load_config,
                                run_experiment)


def tiny_config(path: Path) -> Path:
    """The checked-in config with tiny data and narrow layers, so the whole pipeline runs in seconds."""
    cfg = load_config()
    cfg.pop("_source")
    cfg["data"]["quick"] = {"per_class": 1, "size": 32, "seed": 3, "val_fraction": 0.2}
    cfg["train"]["common"].update(arch_kwargs={"width1": 10, "width2": 15}, batch_size=16)
    cfg["train"]["quick"] = {"epochs": 1}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("experiment")
    opts = ExperimentOptions(out=root / "out", config=tiny_config(root / "cfg.json"), quiet=True, device="cpu")
    return run_experiment(opts)


def test_table_structure_and_numbers_equal_the_dissections(experiment) -> None:
    rows = experiment.rows
    assert [(r["run"], r["layer"]) for r in rows] == [(run, layer) for run in RUNS for layer in LAYERS]
    saved = json.loads(experiment.table_json.read_text())
    assert saved["rows"] == rows
    for r in rows:
        summary = json.loads((experiment.out / "dissect" / f"{r['run']}-seed0" / "summary.json").read_text())
        layer = next(l for l in summary["layers"] if l["name"] == r["layer"])
        for d, table in (("paper", rows), ("top_label", saved["rows_top_label"])):
            row = next(t for t in table if (t["run"], t["layer"]) == (r["run"], r["layer"]))
            per_cat = layer["unique_detectors"][d]["per_category"]
            assert [row[c] for c in CATEGORIES] == [per_cat.get(c, 0) for c in CATEGORIES]
            assert row["total"] == sum(per_cat.get(c, 0) for c in CATEGORIES)
        ckpt_metrics = summary["model"]["metrics"]
        assert r["val_top1"] == pytest.approx(ckpt_metrics["val_top1"])
        assert r["paper"] == dict(zip((*CATEGORIES, "total"), PAPER_TABLE1[(r["run"], r["layer"])]))


def test_markdown_table_shows_ours_beside_the_paper(experiment) -> None:
    text = experiment.table_md.read_text()
    lines = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| Regularizer")]
    assert len(lines) == 2 * len(RUNS) * len(LAYERS)  # one table per definition
    first = lines[0].split("|")[1:-1]
    r = experiment.rows[0]
    assert first[0].strip() == "Weight decay" and first[1].strip() == "conv1"
    assert first[2].strip() == f"{r['color']:.0f} / {r['paper']['color']}"
    assert first[5].strip() == f"{r['total']:.0f} / {r['paper']['total']}"


def test_reports_and_comparison_page_exist(experiment) -> None:
    from reports.experiment import render_experiment

    views = render_experiment(experiment)
    assert set(views.reports) == set(RUNS)
    for path in views.reports.values():
        assert path.name == "index.html" and path.is_file()
    html = views.compare_html.read_text()
    assert "R_bn + L_g + L_s" in html and "http://" not in html and "https://" not in html


def test_rerun_reuses_training_and_dissection(experiment) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in (experiment.out / "runs").glob("*/latest.pth")}
    stamps.update({p: p.stat().st_mtime_ns for p in (experiment.out / "dissect").glob("*/summary.json")})
    opts = ExperimentOptions(out=experiment.out, config=experiment.out.parent / "cfg.json", quiet=True,
                             device="cpu", report=False)
    again = run_experiment(opts)
    assert again.rows == experiment.rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_bad_config_and_options_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {}, "train": {}, "runs": {"weight_decay": {}}, "dissect": {}}))
    with pytest.raises(InputError, match="rbn"):
        load_config(bad)
    assert main(["demo", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert main(["demo", "--out", str(tmp_path / "o"), "--seeds", "0"]) == 2
