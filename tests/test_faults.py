"""Issue 13, faults and bad input: wrong-typed checkpoints, damaged run states, network failures inside
`dissect run`, SIGINT, and the smaller holes (psi model fingerprint, reuse of a damaged results
directory, NaN activations, absurd architecture sizes, a directory as the model file, named datasets
in the cache dir, --allow-outside-links)."""
from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from broden.errors import InputError
from broden.writer import BrodenWriter
from dissect.checkpoint import CheckpointError, make_checkpoint, save_checkpoint, validate_checkpoint
from dissect.cli import main
from test_run_cli import red_detector_checkpoint, run_args


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ckpt(tmp) -> Path:
    return red_detector_checkpoint(tmp / "red.pth")


def _good_checkpoint() -> dict:
    from dissect.architectures import build_model

    kwargs = {"num_classes": 2, "input_size": 32, "width1": 1, "width2": 1}
    model = build_model("tiny_cnn", **kwargs)
    return make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(), groups={},
                           normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, input_size=32,
                           train_options={"data": "synthetic"}, epoch=1)


# ---------------------------------------------------------------- 1. wrong-typed checkpoint fields

# field -> a value of the wrong type; each gave a bare TypeError/AttributeError (exit 1) before
BAD_FIELDS = {
    "version": "1",
    "groups": ["conv1"],
    "normalization": {"mean": 0.5, "std": 0.5},
    "state_dict": {"conv1.weight": [1.0, 2.0]},
    "arch_kwargs": ["width1", 1],
    "input_size": "32",
    "arch": 7,
    "epoch": "one",
}


def _bad_checkpoint(path: Path, field: str) -> Path:
    ckpt = _good_checkpoint()
    ckpt[field] = BAD_FIELDS[field]
    torch.save(ckpt, path)  # not save_checkpoint: it would refuse to write it
    return path


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_validate_checkpoint_checks_types_naming_the_field(field):
    ckpt = _good_checkpoint()
    ckpt[field] = BAD_FIELDS[field]
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint(ckpt, "some/file.pth")
    assert "some/file.pth" in str(e.value) and repr(field) in str(e.value)


@pytest.mark.parametrize("field, value", [("groups", {"conv1": {"groups": "2"}}),
                                          ("normalization", {"mean": [[0.5] * 3] * 3, "std": [0.5] * 3}),
                                          ("normalization", {"mean": [0.5] * 3, "std": [0.5, 0.5, 0.0]}),
                                          ("state_dict", ["conv1.weight"]),
                                          ("version", True)])
def test_validate_checkpoint_checks_nested_values(field, value):
    ckpt = _good_checkpoint()
    ckpt[field] = value
    with pytest.raises(CheckpointError, match=field):
        validate_checkpoint(ckpt, "f.pth")


def test_a_good_checkpoint_still_validates():
    ckpt = _good_checkpoint()
    assert validate_checkpoint(ckpt) is ckpt
    ckpt["input_size"] = None  # a model without a fixed size
    ckpt["groups"] = {"conv1": {"groups": 1, "free": 0, "channels": 1}}
    assert validate_checkpoint(ckpt) is ckpt


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_wrong_typed_checkpoint_exits_2_in_every_command(tmp_path, capsys, field):
    from cgl_train.cli import main as train_main

    path = _bad_checkpoint(tmp_path / "bad.pth", field)
    assert main(["layers", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and repr(field) in err and "Traceback" not in err
    assert main(run_args(tmp_path, path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(path) in err and repr(field) in err
    assert not (tmp_path / "out").exists()
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "latest.pth")
    assert train_main(["--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "latest.pth") in err and repr(field) in err


# ---------------------------------------------------------------- 1. incomplete run states

@pytest.fixture(scope="module")
def concept_root(tmp_path_factory):
    from test_pipeline import make_concept_broden

    return make_concept_broden(tmp_path_factory.mktemp("state") / "broden", n=10)


@pytest.fixture(scope="module")
def reference(concept_root, tmp_path_factory):
    from dissect.runner import dissect_model
    from test_pipeline import LAYERS, ConceptNet, config

    out = tmp_path_factory.mktemp("ref") / "out"
    dissect_model(ConceptNet().eval(), concept_root, LAYERS, config(batch_size=2, keep_activations="no"), out=out)
    return out


def _damage_stage(state: dict, damage: str) -> object:
    if damage == "no-next":
        del state["next"]
    elif damage == "no-layer":
        del state["quantiles"]["pool"]
    elif damage == "no-values":
        del state["quantiles"]["units"]["values"]
    elif damage == "next-out-of-range":
        state["next"] = 999
    elif damage == "next-disagrees":  # the statistics hold 4 images, 'next' says 6
        state["next"] = 6
    elif damage == "not-a-dict":
        return [state["key"]]
    return state


@pytest.mark.parametrize("damage", ["no-next", "no-layer", "no-values", "next-out-of-range", "next-disagrees",
                                    "not-a-dict"])
def test_incomplete_run_state_is_discarded_with_a_warning(concept_root, reference, tmp_path, caplog, damage):
    from dissect.runner import dissect_model
    from dissect.state import STATE_DIRNAME
    from test_pipeline import LAYERS, ConceptNet, config
    from test_resume import FILES, Killed, kill_after

    out = tmp_path / "out"
    model = ConceptNet().eval()
    handle = kill_after(model, 4)  # killed in stage 1, after two saved batches
    cfg = config(batch_size=2, keep_activations="no", save_every=1, save_interval_s=0)
    with pytest.raises(Killed):
        dissect_model(model, concept_root, LAYERS, cfg, out=out)
    handle.remove()
    (path,) = (out / STATE_DIRNAME).rglob("stage1.pt")
    state = torch.load(path, weights_only=True)
    assert state["next"] == 4
    torch.save(_damage_stage(state, damage), path)
    with caplog.at_level(logging.WARNING, logger="dissect"):
        dissect_model(model, concept_root, LAYERS, cfg, out=out)
    assert any("run state" in r.getMessage() and str(path) in r.getMessage() and "recomput" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    for name in LAYERS:
        for f in FILES:
            assert (out / name / f).read_bytes() == (reference / name / f).read_bytes(), (name, f)


# ---------------------------------------------------------------- 1. a network failure is not bad input

def test_download_failure_inside_run_exits_1(tmp_path, ckpt, capsys, monkeypatch):
    import broden.download as download

    def unreachable(url, part, timeout, retries, show_progress):
        raise download._Unreachable("connection refused")

    monkeypatch.delenv(download.MIRRORS_ENV, raising=False)
    monkeypatch.setattr(download, "_fetch", unreachable)
    rc = main(run_args(tmp_path, ckpt, tmp_path / "out", "--download", "--mirror", "http://127.0.0.1:9/",
                       dataset="broden1_224"))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "could not be reached" in err and "broden1_224.zip" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 1. SIGINT

def test_help_and_readme_document_exit_130(capsys):
    from cgl_train.cli import main as train_main

    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "130" in text and "interrupted" in text
    assert train_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "130 interrupted" in text
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "130 interrupted (Ctrl-C, SIGINT" in readme and "--resume" in readme


def test_cgl_train_interrupt_exits_130_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    import cgl_train.engine as engine
    from cgl_train.cli import main as train_main

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    out = tmp_path / "run"
    assert train_main(["--data", "synthetic", "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"cgl-train --resume --out {out}" in err
