"""The input-size decision: a model's native size against the images' (dissect.input_size, --input-size-rule)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from broden_fixtures import make_tiny_broden
from broden.errors import InputError
from dissect.checkpoint import make_checkpoint, save_checkpoint
from dissect.cli import main
from dissect.input_size import decide_input_size
from dissect.models import load_model


def tiny_checkpoint(path: Path, input_size: int | None) -> Path:
    """A seeded tiny_cnn (4/4 filters) checkpoint recording `input_size` as its training size."""
    from cgl_train.models import build_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 2, "input_size": input_size or 64, "width1": 4, "width2": 4}
    model = build_model("tiny_cnn", **kwargs)
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(), groups={},
                           normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, input_size=input_size)
    return save_checkpoint(ckpt, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_broden(tmp_path_factory.mktemp("size") / "broden")


def dissect_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(model), "--dataset", str(data), "--out", str(out), "--layers", "conv1", "--quiet",
            "--device", "cpu", "--cache-dir", str(out.parent / "cache"), "--no-report", *extra]


def decision(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["model"]["preprocessing"]


def test_far_off_native_size_is_used_with_a_warning_and_recorded(tiny, tmp_path, caplog):
    ckpt = tiny_checkpoint(tmp_path / "c32.pth", 32)  # 4x the 8-px images
    out = tmp_path / "native"
    with caplog.at_level(logging.WARNING, logger="dissect.input_size"):
        assert main(dissect_args(ckpt, tiny, out)) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "dissect.input_size"]
    assert len(warned) == 1 and "8x8 px" in warned[0] and "resizing them to 32" in warned[0]
    pre = decision(out)
    assert pre["native_input_size"] == 32 and pre["input_size_from"] == "checkpoint"
    d = pre["input_size_decision"]
    assert (d["used"], d["native"], d["data"], d["rule"]) == (32, 32, [8, 8], "native")
    assert "more than 2x" in d["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["input_size"] == 32 and summary["options"]["input_size_rule"] == "native"
    assert summary["layers"][0]["shape"][1:] == [32, 32]  # the model really ran at 32 px

    # the same size given explicitly is the same dissection: same run key, so the run is reused
    caplog.clear()
    explicit = dissect_args(ckpt, tiny, out, "--input-size", "32")
    with caplog.at_level(logging.WARNING, logger="dissect.input_size"):
        assert main(explicit) == 0
    assert not [r for r in caplog.records if r.name == "dissect.input_size"]  # a choice made: no warning
    assert json.loads((out / "summary.json").read_text())["run_key"] == summary["run_key"]


def test_rule_fail_exits_2_asking_for_input_size(tiny, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c32.pth", 32)
    out = tmp_path / "fail"
    assert main(dissect_args(ckpt, tiny, out, "--input-size-rule", "fail")) == 2
    err = capsys.readouterr().err
    assert "--input-size" in err and "8x8 px" in err and "32" in err and "checkpoint" in err
    assert not (out / "summary.json").exists()
    # an explicit --input-size is a decision: the rule does not apply
    assert main(dissect_args(ckpt, tiny, out, "--input-size-rule", "fail", "--input-size", "8")) == 0
    d = decision(out)["input_size_decision"]
    assert (d["used"], d["reason"]) == (8, "--input-size given")
    assert decision(out)["input_size_from"] == "--input-size"
    assert json.loads((out / "summary.json").read_text())["layers"][0]["shape"][1:] == [8, 8]


def test_within_2x_keeps_the_checkpoint_size_as_before(tiny, tmp_path, caplog):
    ckpt = tiny_checkpoint(tmp_path / "c16.pth", 16)  # exactly 2x: not "more than 2x"
    out = tmp_path / "near"
    with caplog.at_level(logging.WARNING, logger="dissect.input_size"):
        assert main(dissect_args(ckpt, tiny, out, "--input-size-rule", "fail")) == 0
    assert not [r for r in caplog.records if r.name == "dissect.input_size"]
    d = decision(out)["input_size_decision"]
    assert d["used"] == 16 and "within 2x" in d["reason"]


def test_unknown_native_size_feeds_the_images_as_they_are(tiny, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "none.pth", None)  # a checkpoint that records no input size
    out = tmp_path / "unknown"
    assert main(dissect_args(ckpt, tiny, out, "--input-size-rule", "fail")) == 0
    pre = decision(out)
    assert pre["native_input_size"] is None and pre["normalization_from"] == "checkpoint"
    assert pre["input_size_decision"]["used"] is None and "unknown" in pre["input_size_decision"]["reason"]
    assert json.loads((out / "summary.json").read_text())["layers"][0]["shape"][1:] == [8, 8]


def test_decide_input_size_by_hand(tmp_path):
    loaded = load_model(tiny_checkpoint(tmp_path / "c.pth", 224))
    assert loaded.native_input_size == 224 and loaded.input_size == 224
    far = decide_input_size(loaded, (64, 64), None, "native")  # the resnet18 at 64 px
    assert far.input_size == 224 and far.input_size_decision["data"] == [64, 64]
    assert loaded.input_size_decision is None  # a copy: the loaded model is left as it was
    with pytest.raises(InputError, match=r"64x64 px .* native input size is 224"):
        decide_input_size(loaded, (64, 64), None, "fail")
    # "in either direction": images much larger than the model's size count too
    with pytest.raises(InputError, match="more than 2x"):
        decide_input_size(load_model(tiny_checkpoint(tmp_path / "s.pth", 32)), (32, 80), None, "fail")
    assert decide_input_size(loaded, (112, 448), None, "fail").input_size == 224  # 2x both ways: fine
    assert decide_input_size(loaded, None, None, "fail").input_size == 224  # no image size known

