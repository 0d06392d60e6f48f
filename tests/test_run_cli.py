"""`dissect run` end to end: a hand-set red detector on the synthetic shapes set, reuse, and exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dissect.checkpoint import make_checkpoint, save_checkpoint
from dissect.cli import main


def red_detector_checkpoint(path: Path) -> Path:
    """tiny_cnn whose single conv1 filter computes R - G - B - 1 at the centre tap (inputs in [-1, 1]).

    A pixel with red fraction f (after resizing) gives 4f - 2: relu1 fires where red dominates.
    The checkpoint's input size 32 makes dataset images (64 px) 32 px, the label maps' size,
    and centres each resized pixel on the point where the generator samples its label pixel.
    """
    from cgl_train.models import build_model

    kwargs = {"num_classes": 2, "input_size": 32, "width1": 1, "width2": 1}
    model = build_model("tiny_cnn", **kwargs)
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
        model.conv1.bias.fill_(-1.0)
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(), groups={},
                           normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, input_size=32)
    return save_checkpoint(ckpt, path)


# Centre-weighted 3x3 blur: after the antialiased 64 -> 32 px resize it grades the response inside red
# shapes (highest in their interiors), so the default top-0.5% threshold cuts inside red instead of
# sitting on a flat plateau that the strict `>` would leave empty.
BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def graded_red_checkpoint(path: Path, **ckpt_fields) -> Path:
    """tiny_cnn whose conv1 computes BLUR * (R - G - B) - 1 (inputs in [-1, 1]): 2 inside red, < 0 off it."""
    from cgl_train.models import build_model

    kwargs = {"num_classes": 2, "input_size": 32, "width1": 1, "width2": 1}
    model = build_model("tiny_cnn", **kwargs)
    with torch.no_grad():
        model.conv1.weight[0] = torch.stack([BLUR, -BLUR, -BLUR])
        model.conv1.bias.fill_(-1.0)
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(), groups={},
                           normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, input_size=32, **ckpt_fields)
    return save_checkpoint(ckpt, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return tmp, red_detector_checkpoint(tmp / "red.pth")


def run_args(tmp: Path, ckpt: Path, out: Path, *extra: str, layer: str = "relu1",
             dataset: str = "synthetic") -> list[str]:
    # The unit is flat (2) inside red shapes: with the strict `up > T` a threshold inside that plateau
    # masks nothing, so take the top 5% (red covers ~2% of pixels): T falls on the background (0).
    return ["run", str(ckpt), "--dataset", dataset, "--synthetic-per-class", "1", "--cache-dir", str(tmp),
            "--out", str(out), "--layers", layer, "--quantile", "0.05", "--quiet", "--device", "cpu", *extra]


def test_red_detector_gets_red(setup, capsys):
    tmp, ckpt = setup
    out = tmp / "out"
    assert main(run_args(tmp, ckpt, out)) == 0
    units = json.loads((out / "relu1" / "units.json").read_text())
    u = units["units"][0]
    assert (u["label"], u["category"]) == ("red", "color")
    assert u["iou"] > 0.88  # 0.91: boundary pixels of ~6 px label shapes differ
    assert u["threshold"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["kind"] == "checkpoint" and summary["model"]["arch"] == "tiny_cnn"
    assert summary["dataset"]["categories"] == ["color", "shape", "color_shape"]
    assert summary["options"]["top_fraction"] == 0.05 and summary["options"]["input_size"] == 32
    layer = summary["layers"][0]
    assert layer["detectors"] == 1 and layer["detectors_per_category"]["color"] == 1
    assert layer["unique_detectors"]["top_label"]["total"] == 1
    tally = (out / "relu1" / "tally.csv").read_text().splitlines()
    assert tally[1].startswith("1,color,red,")
    assert "relu1: 1 units, 1 detectors" in capsys.readouterr().out

    # the same command again reuses the finished run; --force recomputes it
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert main(run_args(tmp, ckpt, out)) == 0
    assert "reusing" in capsys.readouterr().out
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    assert main(run_args(tmp, ckpt, out, "--force")) == 0
    assert "reusing" not in capsys.readouterr().out
    # a changed option is a different dissection
    assert main(run_args(tmp, ckpt, out, "--union", "original")) == 0
    assert json.loads((out / "summary.json").read_text())["options"]["union"] == "original"


def test_bad_input_exits_2(setup, capsys):
    tmp, ckpt = setup
    out = tmp / "bad"
    assert main(run_args(tmp, ckpt, out, layer="conv9")) == 2
    err = capsys.readouterr().err
    assert "conv9" in err and "conv1" in err  # names the valid layers
    assert main(run_args(tmp, ckpt, out, "--quantile", "2")) == 2
    err = capsys.readouterr().err
    assert "top_fraction" in err and "--quantile 2.0" in err
    assert main(["run", str(tmp / "missing.pth"), "--dataset", "synthetic", "--out", str(out)]) == 2
    assert main(run_args(tmp, ckpt, out, dataset="no_such_dataset")) == 2
    assert "broden1_224" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


# ---------------------------------------------------------------- default options, graded response

@pytest.fixture(scope="module")
def graded(setup):
    tmp, _ = setup
    return graded_red_checkpoint(tmp / "graded.pth")


def _red_pixels_and_total(root: Path) -> tuple[int, int]:
    """Red (id 1) label pixels and all label pixels of the color planes, read straight from the PNGs."""
    import csv

    import numpy as np
    from PIL import Image

    red = total = 0
    with open(root / "index.csv", newline="") as f:
        for row in csv.DictReader(f):
            rgb = np.asarray(Image.open(root / "images" / row["color"]).convert("RGB")).astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1]
            red += int((ids == 1).sum())
            total += ids.size
    return red, total


def test_graded_red_detector_with_default_options(setup, graded):
    from broden.synthetic import synthetic_dir

    tmp, _ = setup
    out = tmp / "graded_out"
    args = ["run", str(graded), "--dataset", "synthetic", "--synthetic-per-class", "1", "--cache-dir", str(tmp),
            "--out", str(out), "--layers", "relu1", "--quiet", "--device", "cpu", "--no-report"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["top_fraction"] == 0.005  # the default
    unit = json.loads((out / "relu1" / "units.json").read_text())["units"][0]
    color = unit["per_category"]["color"]
    assert color["label"] == "red"
    assert unit["label"].startswith("red")  # red, or the red shape whose interiors fill the mask
    # Bound: the top 0.5% of N*h*w values can cover at most 0.005*N*h*w of the red pixels G, so
    # IoU <= 0.005*N*h*w / G (about 0.24 here: red covers ~2% of the label pixels); the graded response
    # reaches it up to the ties at the threshold. Every masked pixel is red (precision 1): I == A.
    red, total = _red_pixels_and_total(synthetic_dir(tmp, per_class=1, size=64))
    assert color["truth"] == red
    assert color["intersection"] == color["activation"] > 0
    assert color["activation"] <= 0.005 * total + 1
    assert color["iou"] == pytest.approx(color["activation"] / red, rel=1e-9)
    assert color["iou"] >= 0.7 * 0.005 * total / red  # 0.185 of the bound 0.245: ties at T drop out
    assert unit["threshold"] > 1.0 and unit["threshold"] < 2.0  # inside the graded range, below the interior maximum 2
    assert summary["layers"][0]["detectors"] == 1

    # labelled with colours only, the same unit is a red detector
    assert main([*args, "--categories", "color"]) == 0
    unit = json.loads((out / "relu1" / "units.json").read_text())["units"][0]
    assert (unit["label"], unit["category"]) == ("red", "color")


def test_explicit_normalize_wins_and_is_recorded(setup, graded):
    tmp, _ = setup
    out = tmp / "norm_out"
    assert main(["run", str(graded), "--dataset", "synthetic", "--synthetic-per-class", "1", "--cache-dir",
                 str(tmp), "--out", str(out), "--layers", "relu1", "--quiet", "--device", "cpu", "--no-report",
                 "--limit", "3", "--normalize", "imagenet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    norm = summary["model"]["normalization"]
    assert norm == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert summary["options"]["normalize"] == "imagenet"
    # what was applied: inside a red shape (pure (1, 0, 0) on the 0..1 scale) the unit gives
    # sum(BLUR) * (xR - xG - xB) - 1 with x = (v - mean) / std; images 0-2 all hold red shapes
    x = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.0), norm["mean"], norm["std"])]
    expected = x[0] - x[1] - x[2] - 1.0  # 5.089; the checkpoint's own normalisation would give 2
    unit = json.loads((out / "relu1" / "units.json").read_text())["units"][0]
    assert max(t["max_activation"] for t in unit["top_images"]) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- stale outputs

def test_rerun_with_other_layers_removes_stale_outputs(setup, graded):
    tmp, _ = setup
    out = tmp / "stale"
    base = ["run", str(graded), "--dataset", "synthetic", "--synthetic-per-class", "1", "--cache-dir", str(tmp),
            "--out", str(out), "--quiet", "--device", "cpu", "--no-report", "--limit", "4"]
    assert main([*base, "--layers", "conv1", "relu1"]) == 0
    assert (out / "conv1" / "tally.csv").is_file()
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("old report")
    (out / "mine.txt").write_text("user file")
    assert main([*base, "--layers", "relu1"]) == 0
    assert not (out / "conv1").exists() and not (out / "report").exists()
    assert (out / "mine.txt").read_text() == "user file" and (out / "relu1" / "units.json").is_file()
    assert [layer["name"] for layer in json.loads((out / "summary.json").read_text())["layers"]] == ["relu1"]


# ---------------------------------------------------------------- the synthetic set a checkpoint was trained on

def test_checkpoint_trained_on_synthetic_uses_its_set(setup, tmp_path):
    from broden.synthetic import generate_shapes_dataset, synthetic_dir

    tmp, _ = setup
    trained_on = generate_shapes_dataset(tmp_path / "trained_on", per_class=1, size=64, seed=0, progress=False)
    train = {"data": "synthetic", "synthetic_dir": str(trained_on), "synthetic_per_class": 1,
             "synthetic_size": 64, "synthetic_seed": 0, "synthetic_val_fraction": 0.2}
    ckpt = graded_red_checkpoint(tmp_path / "c.pth", train_options=train)
    args = ["run", str(ckpt), "--dataset", "synthetic", "--cache-dir", str(tmp), "--layers", "relu1",
            "--quiet", "--device", "cpu", "--no-report", "--limit", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["dataset"]["root"] == str(trained_on)
    # its directory is gone: the same parameters (per_class 1, not the default 640) in the cache dir
    ckpt = graded_red_checkpoint(tmp_path / "c2.pth",
                                 train_options={**train, "synthetic_dir": str(tmp_path / "gone")})
    assert main([*args[:1], str(ckpt), *args[2:], "--out", str(tmp_path / "b")]) == 0
    root = json.loads((tmp_path / "b" / "summary.json").read_text())["dataset"]["root"]
    assert root == str(synthetic_dir(tmp, per_class=1, size=64, seed=0, val_fraction=0.2))


def test_synthetic_source_precedence():
    from types import SimpleNamespace

    from dissect.datasets import synthetic_source

    assert synthetic_source(SimpleNamespace(checkpoint=None)) == (
        {"per_class": 640, "size": 64, "seed": 0, "val_fraction": 0.2}, None)
    train = {"data": "synthetic", "synthetic_dir": "/nonexistent/x", "synthetic_per_class": 3,
             "synthetic_size": 32, "synthetic_seed": 7, "synthetic_val_fraction": 0.25}
    loaded = SimpleNamespace(checkpoint={"train_options": train})
    assert synthetic_source(loaded) == ({"per_class": 3, "size": 32, "seed": 7, "val_fraction": 0.25}, None)
    assert synthetic_source(loaded, per_class=5, size=48)[0] == {"per_class": 5, "size": 48, "seed": 7,
                                                                 "val_fraction": 0.25}
    other = SimpleNamespace(checkpoint={"train_options": {**train, "data": "/imagenet"}})
    assert synthetic_source(other)[0]["per_class"] == 640  # not trained on synthetic data: the defaults


# ---------------------------------------------------------------- messages, help, pipes

@pytest.mark.parametrize("flag, value", [("--quantile", "2"), ("--save-interval", "-1"),
                                         ("--group-threshold", "1.5"), ("--group-threshold", "-0.1"),
                                         ("--group-alpha", "2")])
def test_errors_name_the_flag(setup, capsys, flag, value):
    tmp, ckpt = setup
    assert main(["run", str(ckpt), "--dataset", "synthetic", "--synthetic-per-class", "1", "--cache-dir", str(tmp),
                 "--out", str(tmp / "flags"), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {float(value)!r}" in err
    assert not (tmp / "flags").exists()


def test_help_says_how_to_pick_arch_and_torchscript(capsys):
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "torchvision first" in text and "'torchvision:alexnet' or 'cgl:alexnet'" in text
    assert "TorchScript archive needs --arch NAME" in text
    assert main(["layers", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "'torchvision:alexnet' or 'cgl:alexnet'" in text


def test_broken_pipe_exits_quietly(setup, monkeypatch, capsys):
    import sys

    class ClosedPipe:
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise OSError("no descriptor")

    tmp, ckpt = setup
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["layers", str(ckpt)]) == 0
    monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err
