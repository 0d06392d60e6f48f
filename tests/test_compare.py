"""`dissect compare`: md, csv and html tables equal the runs' summary.json numbers and differences."""
from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dissect.cli import main
from results_fixture import make_dataset, make_results_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("cmp")
    dataset = make_dataset(root / "broden", seed=0)
    a = make_results_dir(root / "wd", seed=10, metrics={"val_acc": 0.8, "top5": {"acc": 0.95}},
                         dataset_root=dataset)
    b = make_results_dir(root / "cgl", seed=11, metrics={"val_acc": 0.7}, dataset_root=dataset)
    return a, b, json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())


def _unique(summary: dict, layer: str, category: str | None, definition: str = "paper") -> int:
    meta = next(l for l in summary["layers"] if l["name"] == layer)["unique_detectors"][definition]
    return meta["total"] if category is None else meta["per_category"][category]


def test_csv_values_and_differences(runs, capsys: pytest.CaptureFixture) -> None:
    a, b, sa, sb = runs
    assert main(["compare", str(a), str(b), "--format", "csv", "--names", "wd,cgl"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    got = {(r["table"], r["run"], r["layer"], r["category"], r["metric"]): (r["value"], r["diff_vs_first"])
           for r in rows}
    for layer in ("conv1", "conv2"):
        for cat in ("color", "shape", None):
            va, vb = _unique(sa, layer, cat), _unique(sb, layer, cat)
            key = ("unique_per_category", "cgl", layer, cat or "", "unique_paper")
            assert got[key] == (str(vb), str(vb - va))
            assert got[key[:1] + ("wd",) + key[2:]] == (str(va), "0")
    sum_a = _unique(sa, "conv1", None) + _unique(sa, "conv2", None)
    sum_b = _unique(sb, "conv1", None) + _unique(sb, "conv2", None)
    assert got[("unique_per_layer", "cgl", "", "", "unique_paper_sum")] == (str(sum_b), str(sum_b - sum_a))
    value, diff = got[("rud", "cgl", "", "", "rud_last_two_paper")]
    assert float(value) == sb["rud_last_two"]["paper"]
    assert float(diff) == pytest.approx(sb["rud_last_two"]["paper"] - sa["rud_last_two"]["paper"])
    assert got[("metrics", "cgl", "", "", "val_acc")][0] == "0.7"
    assert float(got[("metrics", "cgl", "", "", "val_acc")][1]) == pytest.approx(-0.1)
    assert got[("metrics", "wd", "", "", "top5.acc")] == ("0.95", "0.0")
    assert got[("metrics", "cgl", "", "", "top5.acc")] == ("", "")  # not recorded for that run


def test_markdown_table(runs, capsys: pytest.CaptureFixture) -> None:
    a, b, sa, sb = runs
    assert main(["compare", str(a), str(b), "--names", "wd,cgl", "--definition", "top_label"]) == 0
    full = capsys.readouterr().out
    md = full.split("## Detectors and unique detectors at each IoU threshold")[0]  # tables 1-3
    assert "### Unique detectors (paper definition, IoU threshold 0.08)" in full
    assert "`top_label` definition" in md
    lines = [line for line in md.splitlines() if line.startswith("| cgl | conv2 |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    expected = []
    for cat in ("color", "shape", None):
        vb, va = _unique(sb, "conv2", cat, "top_label"), _unique(sa, "conv2", cat, "top_label")
        expected.append(f"{vb} ({vb - va:+d})")
    assert cells == ["cgl", "conv2"] + expected
    first = [line for line in md.splitlines() if line.startswith("| wd | conv1 |")][0]
    assert "(" not in first  # no differences on the first run's rows
    assert "| run | val_acc | top5.acc | RUD conv1 | RUD conv2 | RUD last two layers |" in md


def test_html_page(runs, tmp_path: Path) -> None:
    a, b, sa, sb = runs
    out = tmp_path / "cmp" / "compare.html"
    assert main(["compare", str(a), str(b), "--format", "html", "--out", str(out), "--names", "wd,cgl"]) == 0
    text = out.read_text()
    assert "http://" not in text and "https://" not in text

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.cells: list[dict[str, str]] = []
            self.images: list[str] = []

        def handle_starttag(self, tag, attrs):
            d = {k: v or "" for k, v in attrs}
            if tag == "td" and "data-metric" in d:
                self.cells.append(d)
            if tag in ("img", "script", "link"):
                self.images.append(d.get("src") or d.get("href") or "")

    parser = Cells()
    parser.feed(text)
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    png = (tmp_path / "cmp" / "compare-figures" / "unique-per-layer.png").read_bytes()
    assert png[:4] == b"\x89PNG" and b"http" not in png
    table2 = {(c["data-run"], c["data-layer"]): c for c in parser.cells
              if c["data-metric"] == "unique_paper" and not c["data-category"]}
    for layer in ("conv1", "conv2"):
        vb, va = _unique(sb, layer, None), _unique(sa, layer, None)
        assert int(table2[("cgl", layer)]["data-value"]) == vb
        assert int(table2[("cgl", layer)]["data-diff"]) == vb - va
    rud = next(c for c in parser.cells if c["data-metric"] == "rud_last_two_paper" and c["data-run"] == "cgl")
    assert float(rud["data-value"]) == sb["rud_last_two"]["paper"]


def test_compare_errors(runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b, _, _ = runs
    assert main(["compare", str(a)]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--names", "only-one"]) == 2
    assert "--names" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--format", "html"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    out = tmp_path / "t.md"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Dissection runs compared")


def test_incomparable_runs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Differing options, dataset fingerprints and layers are listed; RUD over two layers of a
    one-layer run is marked not available."""
    dataset = make_dataset(tmp_path / "broden", seed=0)
    a = make_results_dir(tmp_path / "a", seed=3, dataset_root=dataset, options={"union": "lite", "batch_size": 8})
    b = make_results_dir(tmp_path / "b", seed=3, dataset_root=dataset, dataset_fingerprint="other",
                         options={"union": "original", "batch_size": 16}, layer_specs=[("conv1", 6, 8)])
    # the same seed on both: only union, batch_size, the fingerprint and conv2 differ
    assert main(["compare", str(a), str(b), "--format", "csv", "--names", "a,b"]) == 0
    rows = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["table"] == "comparability"]
    got = {(r["run"], r["layer"], r["metric"]): r["value"] for r in rows}
    assert got == {
        ("a", "", "option_differs:union"): '"lite"', ("b", "", "option_differs:union"): '"original"',
        ("a", "", "option_differs:batch_size (does not change results)"): "8",
        ("b", "", "option_differs:batch_size (does not change results)"): "16",
        ("a", "", "dataset_fingerprint_differs"): "ds", ("b", "", "dataset_fingerprint_differs"): "other",
        ("b", "conv2", "layer_missing"): "missing",
        ("a", "", "rud_last_two_layers"): "conv1 conv2", ("b", "", "rud_last_two_layers"): "conv1",
        ("b", "", "rud_last_two_unavailable"): "fewer than two layers"}
    assert main(["compare", str(a), str(b), "--format", "csv", "--names", "a,b"]) == 0
    rud = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["metric"] == "rud_last_two_paper"]
    assert [(r["run"], r["value"], r["diff_vs_first"]) for r in rud][1] == ("b", "", "")  # not a number

    assert main(["compare", str(a), str(b), "--names", "a,b"]) == 0
    md = capsys.readouterr().out
    section = md.split("## Comparability")[1].split("\n## ")[0]
    bullets = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(bullets) == 6
    assert "- option union differs (changes results): a = \"lite\", b = \"original\"" in bullets
    assert "- option batch_size differs (does not change results): a = 8, b = 16" in bullets
    assert "- dataset fingerprints differ (the runs saw different data): a = ds, b = other" in bullets
    assert "- layer conv2 is missing from b" in bullets
    assert any(line.startswith("- RUD over the last two layers is not available for b") for line in bullets)
    assert any(line.startswith("- RUD over the last two layers covers different layers") for line in bullets)
    row = [line for line in md.splitlines() if line.startswith("| b |") and "n/a" in line]
    assert len(row) == 1 and row[0].rstrip(" |").endswith("n/a (1 layer)")

    out = tmp_path / "c.html"
    assert main(["compare", str(a), str(b), "--format", "html", "--out", str(out), "--names", "a,b"]) == 0

    class Notes(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.notes: list[tuple[str, str]] = []
            self.cells: list[dict[str, str]] = []

        def handle_starttag(self, tag, attrs):
            d = {k: v or "" for k, v in attrs}
            if tag == "li" and "data-kind" in d:
                self.notes.append((d["data-kind"], d["data-key"]))
            if tag == "td" and d.get("data-metric") == "rud_last_two_paper":
                self.cells.append(d)

    parser = Notes()
    parser.feed(out.read_text())
    assert sorted(parser.notes) == sorted([("option", "union"), ("option", "batch_size"), ("dataset", "fingerprint"),
                                           ("layer", "conv2"), ("rud_last_two", "b"), ("rud_last_two", "layers")])
    assert [c["data-value"] for c in parser.cells if c["data-run"] == "b"] == [""]
    assert "n/a (1 layer)" in out.read_text()


def test_comparable_runs_say_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = make_dataset(tmp_path / "broden", seed=0)
    a = make_results_dir(tmp_path / "a", seed=3, dataset_root=dataset)
    b = make_results_dir(tmp_path / "b", seed=3, dataset_root=dataset, metrics={"val_acc": 0.5})
    assert main(["compare", str(a), str(b)]) == 0
    assert "The runs agree on every recorded option, the dataset and the layers." in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "--format", "csv"]) == 0
    rows = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["table"] == "comparability"]
    assert {r["metric"] for r in rows} == {"rud_last_two_layers"}


def test_runs_sharing_a_name_are_seeds_of_one_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import statistics

    dataset = make_dataset(tmp_path / "broden", seed=0)
    dirs, names = [], []
    for name, base in (("wd", 30), ("cgl", 40)):
        for s in range(3):
            dirs.append(make_results_dir(tmp_path / f"{name}{s}", seed=base + s, dataset_root=dataset,
                                         metrics={"val_acc": 0.5 + 0.1 * s}))
            names.append(name)
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    argv = ["compare", *map(str, dirs), "--names", ",".join(names), "--format", "csv"]
    assert main(argv) == 0
    rows = {(r["table"], r["run"], r["layer"], r["category"], r["metric"]): r
            for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    wd = [_unique(s, "conv2", None) for s in summaries[:3]]
    cgl = [_unique(s, "conv2", None) for s in summaries[3:]]
    row = rows[("unique_per_category", "cgl", "conv2", "", "unique_paper")]
    assert float(row["value"]) == pytest.approx(statistics.fmean(cgl))
    assert float(row["sd"]) == pytest.approx(statistics.stdev(cgl)) and row["n"] == "3"
    # the seeds differ between the groups, so no pair exists: no difference is made up
    assert row["diff_vs_first"] == ""
    # the seed option differs by design: not listed as a comparability problem
    assert not any(k[0] == "comparability" and "seed" in k[4] for k in rows)
    assert main(argv[:-2]) == 0
    md = capsys.readouterr().out
    assert f"{statistics.fmean(wd):.3f} ± {statistics.stdev(wd):.3f}" in md
    assert "Seeds: wd: 30, 31, 32; cgl: 40, 41, 42." in md
    out = tmp_path / "g.html"
    assert main([*argv[:-2], "--format", "html", "--out", str(out), "--iou-thresholds", "0.05"]) == 0
    html = out.read_text()
    assert 'id="table-unique-paper-0.05"' in html and 'id="table-unique-top_label-0.05"' in html
    assert (tmp_path / "g-figures" / "iou-distributions.png").is_file()


def test_paired_differences_pair_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = make_dataset(tmp_path / "broden", seed=0)
    dirs = [make_results_dir(tmp_path / f"{n}{s}", seed=seed, dataset_root=dataset)
            for n, s, seed in (("a", 0, 5), ("a", 1, 6), ("b", 0, 5), ("b", 1, 6))]
    assert main(["compare", *map(str, dirs), "--names", "a,a,b,b", "--format", "csv", "--baseline", "a"]) == 0
    rows = {(r["table"], r["run"], r["layer"], r["metric"], r["category"]): r
            for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    # the fixture makes the same numbers for the same seed: every paired difference is 0
    assert float(rows[("unique_per_layer", "b", "conv1", "unique_paper", "")]["diff_vs_first"]) == 0.0
    assert main(["compare", *map(str, dirs), "--names", "a,a,b,b", "--baseline", "c"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_run_label_seed_falls_back_to_the_dissection_seed() -> None:
    from dissect.aggregate import run_seed

    # summary.json writes train_seed: null for models that are not cgl-train checkpoints
    assert run_seed({"model": {"train_seed": None}, "seed": 4}) == 4
    assert run_seed({"model": {"train_seed": 7}, "seed": 4}) == 7
    assert run_seed({"model": {}, "seed": 2}) == 2
