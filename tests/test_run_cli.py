"""`dissect run` end to end: a hand-set red detector on the synthetic shapes set, reuse, and exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cgl_train.checkpoint import make_checkpoint, save_checkpoint
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
    assert "top_fraction" in capsys.readouterr().err
    assert main(["run", str(tmp / "missing.pth"), "--dataset", "synthetic", "--out", str(out)]) == 2
    assert main(run_args(tmp, ckpt, out, dataset="no_such_dataset")) == 2
    assert "broden1_224" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
