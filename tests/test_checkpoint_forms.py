"""Checkpoint dicts of common training scripts, read without --arch when they name their architecture.

Each test saves a tiny torchvision model in the layout the script writes: NetDissect-Lite's
model zoo, MIT CSAIL's Places365 zoo (DataParallel `module.` prefixes), torchvision's
references/classification/train.py (an argparse.Namespace under 'args') and timm's train.py.
"""
from __future__ import annotations

import argparse
import fractions
import logging
from pathlib import Path

import pytest
import torch
import torchvision

from broden.errors import InputError
from dissect.models import load_model

NUM_CLASSES = 3


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES).eval()


def _optimizer_state(model: torch.nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(1, 3, 64, 64)).sum().backward()
    opt.step()
    return opt.state_dict()


def _same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> bool:
    a, b = loaded.state_dict(), original.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save(obj: dict, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_lite_zoo_form(tmp_path: Path) -> None:
    net = _model("squeezenet1_1")
    path = _save({"arch": "squeezenet1_1", "num_classes": NUM_CLASSES, "state_dict": net.state_dict()},
                 tmp_path / "lite.pth")
    loaded = load_model(path)
    assert loaded.arch == "squeezenet1_1" and loaded.kind == "state_dict"
    assert _same_weights(loaded.module, net)


def test_places365_form_with_module_prefixes(tmp_path: Path) -> None:
    # ResNets were saved from DataParallel (every key 'module.'), AlexNet/VGG from
    # `model.features = DataParallel(model.features)` ('features.module.0.weight')
    net = _model("shufflenet_v2_x0_5")
    whole = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = _save({"epoch": 90, "arch": "shufflenet_v2_x0_5", "state_dict": whole,
                  "best_prec1": torch.tensor(54.6)}, tmp_path / "places.pth.tar")
    assert _same_weights(load_model(path).module, net)

    squeeze = _model("squeezenet1_1")
    inner = {k.replace("features.", "features.module.", 1): v for k, v in squeeze.state_dict().items()}
    assert any(k.startswith("features.module.") for k in inner) and any(k.startswith("classifier.") for k in inner)
    path = _save({"epoch": 90, "arch": "squeezenet1_1", "state_dict": inner, "best_prec1": 54.6},
                 tmp_path / "places_alexnet_style.pth.tar")
    loaded = load_model(path)
    assert loaded.arch == "squeezenet1_1" and _same_weights(loaded.module, squeeze)


def test_torchvision_reference_train_form(tmp_path: Path) -> None:
    net = _model("shufflenet_v2_x0_5")
    args = argparse.Namespace(model="shufflenet_v2_x0_5", data_path="/datasets/imagenet", lr=0.5, epochs=600,
                              lr_steps=[16, 22], weights=None, amp=False, label_smoothing=0.1)
    opt = _optimizer_state(net)
    path = _save({"model": net.state_dict(), "optimizer": opt,
                  "lr_scheduler": {"last_epoch": 3, "_step_count": 4}, "epoch": 3, "args": args},
                 tmp_path / "checkpoint.pth")
    with pytest.raises(Exception):  # the reason the loader must help: a Namespace is a pickled class
        torch.load(path, weights_only=True)
    loaded = load_model(path)
    assert loaded.arch == "shufflenet_v2_x0_5" and _same_weights(loaded.module, net)


def test_timm_train_form(tmp_path: Path) -> None:
    net = _model("squeezenet1_1")
    args = argparse.Namespace(model="squeezenet1_1", num_classes=NUM_CLASSES, opt="sgd", lr=0.05,
                              mean=None, std=None, input_size=None)
    path = _save({"epoch": 5, "arch": "squeezenet1_1", "state_dict": net.state_dict(),
                  "optimizer": _optimizer_state(net), "version": 2, "args": args, "metric": 71.3},
                 tmp_path / "model_best.pth.tar")
    loaded = load_model(path)
    assert loaded.arch == "squeezenet1_1" and _same_weights(loaded.module, net)


def test_arch_flag_overrides_the_files_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = _model("squeezenet1_1")
    path = _save({"arch": "squeezenet1_0", "state_dict": net.state_dict()}, tmp_path / "misnamed.pth")
    with pytest.raises(InputError, match="do not fit architecture 'squeezenet1_0'"):
        load_model(path)  # the file's own name is used, and does not fit these weights
    with caplog.at_level(logging.INFO, logger="dissect.models"):
        loaded = load_model(path, arch="squeezenet1_1")
    assert loaded.arch == "squeezenet1_1" and _same_weights(loaded.module, net)
    assert any("--arch squeezenet1_1 overrides" in r.getMessage() and "'squeezenet1_0'" in r.getMessage()
               for r in caplog.records)


def test_a_file_without_a_name_needs_arch(tmp_path: Path) -> None:
    net = _model("squeezenet1_1")
    path = _save({"state_dict": net.state_dict(), "epoch": 7, "best_acc": 0.5}, tmp_path / "anonymous.pth")
    with pytest.raises(InputError) as err:
        load_model(path)
    msg = str(err.value)
    assert str(path) in msg and "best_acc, epoch, state_dict" in msg and "--arch" in msg
    assert _same_weights(load_model(path, arch="squeezenet1_1").module, net)


def test_an_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    net = _model("squeezenet1_1")
    path = _save({"arch": "smallcnn", "num_classes": 10, "state_dict": net.state_dict()}, tmp_path / "own.pth")
    with pytest.raises(InputError) as err:
        load_model(path)
    msg = str(err.value)
    assert str(path) in msg and "'smallcnn'" in msg and "key 'arch'" in msg
    assert "valid --arch names" in msg and "squeezenet1_1" in msg and "tiny_cnn" in msg


def test_other_pickled_classes_stay_refused(tmp_path: Path) -> None:
    """Allowing argparse.Namespace must not let any other class through weights_only."""
    net = _model("squeezenet1_1")
    path = _save({"arch": "squeezenet1_1", "state_dict": net.state_dict(), "args": fractions.Fraction(1, 3)},
                 tmp_path / "odd.pth")
    with pytest.raises(InputError, match=r"pickled class \(fractions.Fraction\).*--trust-pickle"):
        load_model(path)
