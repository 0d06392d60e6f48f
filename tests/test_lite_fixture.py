"""Acceptance on a real NetDissect-Lite output (shared/fixtures/netdissect-lite, see its README).

Lite dissected conv1-3 of smallcnn_seed11.pth on broden80 (categories object, part, scene,
texture, color; 78 of 80 images kept). With Lite's own thresholds (its quantile.npy files),
`--images annotated --union lite --upsample pil --normalize lite` must reproduce every label,
category, count and score of its tally.csv, parsed and as raw bytes. With our exact
thresholds, top labels must agree for at least 95% of Lite's detectors (score >= 0.04).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "netdissect-lite"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"NetDissect-Lite fixture not found at {FIXTURE} "
                                "(it lives in the shared/ folder beside the repository)")

LAYERS = ["conv1", "conv2", "conv3"]
CATEGORIES = ["object", "part", "scene", "texture", "color"]  # Lite's settings.CATAGORIES order
LITE_OPTIONS = {"images": "annotated", "union": "lite", "upsample": "pil", "normalize": "lite",
                "categories": CATEGORIES, "layers": LAYERS, "decoded_cache": "off", "quiet": True,
                "device": "cpu", "force": True}


def _smallcnn_module():
    spec = importlib.util.spec_from_file_location("lite_smallcnn", FIXTURE / "smallcnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smallcnn() -> torch.nn.Module:
    ckpt = torch.load(FIXTURE / "smallcnn_seed11.pth", map_location="cpu", weights_only=True)
    net = _smallcnn_module().smallcnn(ckpt["num_classes"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval()


def _lite_thresholds() -> list[str]:
    return [f"{layer}={FIXTURE / 'lite' / layer / 'quantile.npy'}" for layer in LAYERS]


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _parsed(row: dict[str, str]) -> dict[str, object]:
    """A tally row as values: names as text, counts as exact integers, scores as floats."""
    out: dict[str, object] = {}
    for key, value in row.items():
        if key == "unit":
            out[key] = int(value)
        elif key in ("category", "label") or key.endswith("-label"):
            out[key] = value
        elif key.endswith(("-truth", "-activation", "-intersect")):
            number = float(value)
            assert number == int(number), (key, value)
            out[key] = int(number)
        else:  # score, <cat>-iou
            out[key] = float(value)
    return out


@pytest.fixture(scope="module")
def with_lite_thresholds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import dissect

    out = tmp_path_factory.mktemp("lite") / "given"
    dissect.run(_smallcnn(), FIXTURE / "broden80", out, thresholds=_lite_thresholds(), **LITE_OPTIONS)
    return out


@pytest.fixture(scope="module")
def with_own_thresholds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import dissect

    out = tmp_path_factory.mktemp("lite") / "own"
    dissect.run(_smallcnn(), FIXTURE / "broden80", out, **LITE_OPTIONS)
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_lite_thresholds_reproduce_every_tally_value(with_lite_thresholds: Path, layer: str) -> None:
    header, ours = _rows(with_lite_thresholds / layer / "tally.csv")
    lite_header, lite = _rows(FIXTURE / "lite" / layer / "tally.csv")
    assert header == lite_header
    assert len(ours) == len(lite) == {"conv1": 32}.get(layer, 64)
    for mine, theirs in zip(ours, lite):  # row order included
        assert _parsed(mine) == _parsed(theirs)


@pytest.mark.parametrize("layer", LAYERS)
def test_lite_thresholds_reproduce_tally_csv_bytes(with_lite_thresholds: Path, layer: str) -> None:
    assert (with_lite_thresholds / layer / "tally.csv").read_bytes() == \
        (FIXTURE / "lite" / layer / "tally.csv").read_bytes()


def test_summary_records_the_lite_settings(with_lite_thresholds: Path) -> None:
    summary = json.loads((with_lite_thresholds / "summary.json").read_text())
    run = json.loads((FIXTURE / "lite" / "run.json").read_text())
    assert summary["dataset"]["num_images"] == run["layers"]["conv1"]["n_images"] == 78
    assert summary["dataset"]["dropped_images"] == 2
    options = summary["options"]
    assert (options["images"], options["union"], options["upsample"]) == ("annotated", "lite", "pil")
    for entry in summary["layers"]:
        quantile = FIXTURE / "lite" / entry["name"] / "quantile.npy"
        given = entry["thresholds_given"]
        assert given["file"] == str(quantile) and given["dtype"] == "float64"
        assert given["sha256"] == hashlib.sha256(quantile.read_bytes()).hexdigest()
        exact = np.load(with_lite_thresholds / entry["name"] / "thresholds_given.npy")
        assert exact.dtype == np.float64 and np.array_equal(exact, np.load(quantile))
        rounded = np.load(with_lite_thresholds / entry["name"] / "thresholds.npy")
        assert rounded.dtype == np.float32 and np.array_equal(rounded, np.load(quantile).astype(np.float32))
        shape = run["layers"][entry["name"]]["feature_shape"]
        assert entry["shape"] == shape[1:]
    assert options["thresholds"] == _lite_thresholds()


def test_own_thresholds_agree_on_lites_detectors(with_own_thresholds: Path) -> None:
    detectors = agree = 0
    disagreements = []
    for layer in LAYERS:
        ours = {r["unit"]: r for r in _rows(with_own_thresholds / layer / "tally.csv")[1]}
        for row in _rows(FIXTURE / "lite" / layer / "tally.csv")[1]:
            if float(row["score"]) >= 0.04:
                detectors += 1
                if ours[row["unit"]]["label"] == row["label"]:
                    agree += 1
                else:
                    disagreements.append((layer, row["unit"], row["label"], ours[row["unit"]]["label"]))
        # exact quantiles differ from Lite's sketch only slightly
        exact = np.load(with_own_thresholds / layer / "thresholds.npy").astype(np.float64)
        sketch = np.load(FIXTURE / "lite" / layer / "quantile.npy")
        assert np.median(np.abs(exact - sketch) / sketch) < 2e-3
    assert detectors > 30
    assert agree >= 0.95 * detectors, disagreements


def test_cli_reads_lites_checkpoint_by_the_arch_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """The CLI on Lite's own file: {'arch': 'smallcnn', 'num_classes', 'state_dict'}, no --arch."""
    from dissect import architectures
    from dissect.cli import main

    file = str(FIXTURE / "smallcnn_seed11.pth")
    base = ["run", file, "--dataset", str(FIXTURE / "broden80"), "--no-report", "--quiet", "--device", "cpu",
            "--decoded-cache", "off", "--normalize", "lite", "--upsample", "pil", "--union", "lite",
            "--images", "annotated", "--categories", "object,part", "scene", "texture,color"]
    # not a registry architecture: a clear error naming it and the valid names
    assert main(base + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'smallcnn'" in err and "valid --arch names" in err and "resnet18" in err
    assert file in err

    # a test-only registry entry: the file's 'arch' names it, --layers and --categories mix commas and spaces
    monkeypatch.setitem(architectures.MODELS, "smallcnn", _smallcnn_module().smallcnn)
    out = tmp_path / "cli"
    args = base + ["--out", str(out), "--layers", "conv1,conv3",
                   "--thresholds", f"conv1={FIXTURE / 'lite' / 'conv1' / 'quantile.npy'}",
                   "--thresholds", f"conv3={FIXTURE / 'lite' / 'conv3' / 'quantile.npy'}"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["arch"] == "smallcnn" and summary["model"]["kind"] == "state_dict"
    assert summary["options"]["categories"] == ["color", "object", "part", "scene", "texture"]
    assert [entry["name"] for entry in summary["layers"]] == ["conv1", "conv3"]
    for layer in ("conv1", "conv3"):
        assert (out / layer / "tally.csv").read_bytes() == (FIXTURE / "lite" / layer / "tally.csv").read_bytes()


def test_tally_csv_bytes_do_not_depend_on_the_top_image_options(with_lite_thresholds: Path,
                                                                tmp_path: Path) -> None:
    import dissect

    out = tmp_path / "index-ties"
    dissect.run(_smallcnn(), FIXTURE / "broden80", out, thresholds=_lite_thresholds(), top_images_tiebreak="index",
                label_strips="off", **LITE_OPTIONS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["top_images_tiebreak"] == "index"
    default = json.loads((with_lite_thresholds / "summary.json").read_text())["options"]
    assert (default["top_images_tiebreak"], default["label_strips"]) == ("area", "on")
    for layer in LAYERS:  # the defaults' run (with_lite_thresholds) is checked byte for byte above
        assert (out / layer / "tally.csv").read_bytes() == (FIXTURE / "lite" / layer / "tally.csv").read_bytes()
        assert not (out / layer / "label_top_activations.npy").exists()
        assert (with_lite_thresholds / layer / "label_top_activations.npy").is_file()
