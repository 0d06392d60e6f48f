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
from dissect.checkpoint import CheckpointError, make_checkpoint, validate_checkpoint
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


# ---------------------------------------------------------------- 3. psi maps need the dissected model

def test_psi_refuses_a_model_file_that_changed_since_the_run(tmp_path, capsys):
    from broden.download import sha256_file
    from test_run_cli import graded_red_checkpoint

    model = red_detector_checkpoint(tmp_path / "model.pth")
    out = tmp_path / "out"
    assert main(run_args(tmp_path, model, out, "--no-report", "--limit", "4")) == 0
    recorded = json.loads((out / "summary.json").read_text())["model"]["fingerprint"]
    graded_red_checkpoint(model)  # other weights under the same name
    now = sha256_file(model)
    assert now != recorded
    assert main(["report", str(out), "--psi-units", "relu1:0"]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and recorded in err and now in err and "--allow-model-mismatch" in err
    assert not (out / "report" / "index.html").exists()
    assert main(["report", str(out), "--psi-units", "relu1:0", "--allow-model-mismatch"]) == 0
    assert (out / "report" / "figures" / "psi-relu1-unit0000.png").is_file()


# ---------------------------------------------------------------- 3. a damaged results directory is not reused

@pytest.mark.parametrize("victim", ["iou.npy", "tally.csv", "units.json", "thresholds.npy", "top_activations.npy"])
def test_a_finished_run_missing_a_layer_file_is_recomputed(tmp, ckpt, capsys, caplog, victim):
    out = tmp / f"damaged-{victim}"
    args = run_args(tmp, ckpt, out, "--no-report", "--limit", "4")
    assert main(args) == 0
    (out / "relu1" / victim).unlink()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="dissect"):
        assert main(args) == 0
    assert "reusing" not in capsys.readouterr().out
    assert (out / "relu1" / victim).is_file()
    assert any(victim in r.getMessage() and "recomput" in r.getMessage() for r in caplog.records)
    capsys.readouterr()
    assert main(args) == 0  # complete again: reused
    assert "reusing" in capsys.readouterr().out


# ---------------------------------------------------------------- 3. NaN activations name the layer

class _NaNOnWhite(nn.Module):
    """NaN everywhere on an all-white image (x = img / 255 > 0.99 at every pixel), identity elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        white = x.flatten(1).amin(1) > 0.99
        return torch.where(white[:, None, None, None], torch.full_like(x, float("nan")), x)


class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.blowup = _NaNOnWhite()
        self.head = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(3)[:, :, None, None])
            self.stem.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blowup(self.stem(x)))


def _white_broden(root: Path) -> Path:
    """Six 8x8 images; images 3 and 4 are all white, the others darker than 200."""
    rng = np.random.default_rng(0)
    w = BrodenWriter(root, ["color"])
    w.add_label(1, "red")
    for k in range(6):
        img = np.full((8, 8, 3), 255, np.uint8) if k in (3, 4) else rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)
        w.add_image(f"im{k}", img, layers={"color": [(rng.random((4, 4)) < 0.5).astype(np.int32)]})
    w.close()
    return root


def test_nan_activations_name_the_layer_and_the_first_image(tmp_path):
    from dissect.runner import dissect_model
    from test_pipeline import config

    root = _white_broden(tmp_path / "broden")
    with pytest.raises(InputError) as e:
        dissect_model(_NaNNet().eval(), root, ["stem", "head"], config(batch_size=2))
    msg = str(e.value)
    assert "'head'" in msg and "NaN" in msg and "image 3" in msg and "im3" in msg
    assert "'stem'" not in msg  # the layer before the NaN is fine


# ---------------------------------------------------------------- 3. absurd architecture sizes

@pytest.mark.parametrize("kwargs, word", [({"width1": 10 ** 9}, "width1"), ({"width2": 0}, "width2"),
                                          ({"width1": True}, "width1"), ({"width2": 2.5}, "width2"),
                                          ({"num_classes": 10 ** 7}, "num_classes"),
                                          ({"width1": 65536, "width2": 65536}, "parameters")])
def test_absurd_architecture_sizes_are_input_errors(kwargs, word):
    from dissect.architectures import build_model

    with pytest.raises(InputError, match=word):
        build_model("tiny_cnn", **kwargs)


def test_absurd_arch_kwargs_in_a_checkpoint_exit_2(tmp_path, capsys):
    ckpt = _good_checkpoint()
    ckpt["arch_kwargs"] = {**ckpt["arch_kwargs"], "width1": 10 ** 9}
    path = tmp_path / "huge.pth"
    torch.save(ckpt, path)
    assert main(["layers", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "width1" in err and "65536" in err


# ---------------------------------------------------------------- 3. a directory as the model file

def test_a_directory_as_the_model_says_so(tmp_path, ckpt, capsys):
    run = tmp_path / "runs" / "cgl"
    run.mkdir(parents=True)
    shutil.copy(ckpt, run / "best.pth")
    assert main(["layers", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run}: is a directory" in err and "no such" not in err and str(run / "best.pth") in err
    assert main(run_args(tmp_path, run, tmp_path / "out")) == 2
    assert "is a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. named datasets in the cache dir

NAME = "broden1_224"


def _zip_tiny_broden(tmp: Path) -> Path:
    from broden_fixtures import make_tiny_broden

    src = make_tiny_broden(tmp / "src" / NAME)
    archive = tmp / f"{NAME}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"{NAME}/{p.relative_to(src).as_posix()}")
    return archive


def test_a_named_dataset_in_the_cache_is_reused_only_when_its_manifest_vouches(tmp_path):
    from broden.download import extract_archive, extraction_manifest_path
    from dissect.datasets import resolve_dataset

    where = tmp_path / "cache" / "datasets"
    where.mkdir(parents=True)
    extract_archive(_zip_tiny_broden(tmp_path), where, NAME, show_progress=False)
    assert resolve_dataset(NAME, tmp_path / "cache", False, []) == where / NAME
    # a file of the extraction changed and no archive to re-extract from: refused, naming the directory
    (where / NAME / "index.csv").write_text((where / NAME / "index.csv").read_text() + "\n")
    with pytest.raises(InputError) as e:
        resolve_dataset(NAME, tmp_path / "cache", False, [])
    assert str(where / NAME) in str(e.value) and "index.csv" in str(e.value)
    # the same directory passed as a path is read as it is
    assert resolve_dataset(where / NAME, tmp_path / "cache", False, []) == where / NAME
    extraction_manifest_path(where, NAME).unlink()
    with pytest.raises(InputError, match="extraction.json"):
        resolve_dataset(NAME, tmp_path / "cache", False, [])


def test_run_refuses_an_unvouched_named_dataset_in_the_cache(tmp_path, ckpt, capsys):
    from broden_fixtures import make_tiny_broden

    root = make_tiny_broden(tmp_path / "datasets" / NAME)  # anyone's directory under the cache's name
    assert main(run_args(tmp_path, ckpt, tmp_path / "out", dataset=NAME)) == 2
    err = capsys.readouterr().err
    assert str(root) in err and "extraction.json" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. --allow-outside-links

def test_allow_outside_links_option(tmp_path, ckpt, capsys):
    from broden_fixtures import make_tiny_broden

    root = make_tiny_broden(tmp_path / "data" / "broden")
    outside = tmp_path / "outside" / "img3.png"
    outside.parent.mkdir()
    link = root / "images" / "synthetic" / "img3.png"
    shutil.move(link, outside)
    link.symlink_to(outside)
    base = run_args(tmp_path, ckpt, tmp_path / "out", "--no-report", "--decoded-cache", "off",
                    dataset=str(root))
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "--allow-outside-links" in err
    assert main([*base, "--allow-outside-links"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dataset"]["num_images"] == 7
    assert "allow_outside_links" not in summary["options"]  # how data is found, not what is computed
    # building the decoded cache first follows the same rule
    build = [a if a != "off" else "build" for a in base]
    assert main([*build, "--force"]) == 2
    assert "--allow-outside-links" in capsys.readouterr().err
    assert main([*build, "--allow-outside-links", "--force"]) == 0
