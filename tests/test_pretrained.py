"""torchvision pretrained weights read offline from $TORCH_HOME (dissect.pretrained), and timm models.

No test downloads anything: a randomly initialised squeezenet1_1 (5 MB) is saved where torch.hub
keeps its file. Its name carries torch.hub's hash prefix, which a test cannot forge for other
bytes; the tests point the weights entry's url at a name carrying the real prefix of the file
they wrote (so the real check runs and passes), and write random bytes under the published name
to see the check refuse them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import SqueezeNet1_1_Weights

from broden_fixtures import make_tiny_broden
from broden.errors import InputError
from dissect.cli import main
from dissect.models import NORMALIZATIONS, load_requested
from dissect.pretrained import renamed_keys, hash_prefix, weights_file

ENTRY = SqueezeNet1_1_Weights.IMAGENET1K_V1
PUBLISHED_URL = ENTRY.url  # .../squeezenet1_1-b8a52dc0.pth


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; torch.hub's download functions fail the test if called."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # an earlier torch.hub.set_dir would win over TORCH_HOME
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    return home


def random_weights(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture
def installed(hub, tmp_path, monkeypatch) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """Random squeezenet1_1 weights under the name torch.hub would give them: (file, sha256, state_dict)."""
    scratch = tmp_path / "scratch.pth"
    state = random_weights(scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    monkeypatch.setattr(ENTRY.value, "url", f"https://download.pytorch.org/models/squeezenet1_1-{digest[:8]}.pth")
    target = hub / "hub" / "checkpoints" / f"squeezenet1_1-{digest[:8]}.pth"
    target.parent.mkdir(parents=True)
    scratch.rename(target)
    return target, digest, state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_broden(tmp_path_factory.mktemp("pretrained") / "broden")


def run_args(data: Path, out: Path, *model: str) -> list[str]:
    return ["run", *model, "--dataset", str(data), "--out", str(out), "--layers", "features.0", "--quiet",
            "--device", "cpu", "--cache-dir", str(out.parent / "cache"), "--no-report", "--batch-size", "4"]


def test_expected_file_is_the_hub_cache_name_of_the_url(hub):
    assert weights_file(ENTRY) == hub / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    assert hash_prefix("resnet18-f37072fd.pth") == "f37072fd"
    assert hash_prefix("model_final.pth") is None


def test_dissect_run_with_arch_and_weights_offline(installed, tiny, tmp_path, capsys):
    path, digest, _ = installed
    out = tmp_path / "out"
    assert main(run_args(tiny, out, "--arch", "squeezenet1_1", "--weights", "IMAGENET1K_V1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    model = summary["model"]
    assert (model["kind"], model["arch"], model["source"]) == ("pretrained", "torchvision:squeezenet1_1", str(path))
    assert model["fingerprint"] == digest
    w = model["weights"]
    assert (w["name"], w["file"], w["sha256"]) == ("SqueezeNet1_1_Weights.IMAGENET1K_V1", str(path), digest)
    assert w["transforms"]["crop_size"] == [224] and w["transforms"]["resize_size"] == [256]
    assert w["transforms"]["interpolation"] == "bilinear"
    # the weights' preprocessing, and where each part came from
    assert model["normalization"] == NORMALIZATIONS["imagenet"] == {"mean": w["transforms"]["mean"],
                                                                     "std": w["transforms"]["std"]}
    pre = model["preprocessing"]
    assert (pre["normalization_from"], pre["input_size_from"], pre["native_input_size"]) == ("weights", "weights",
                                                                                             224)
    assert pre["input_size_decision"]["used"] == 224 and pre["input_size_decision"]["data"] == [8, 8]
    assert summary["options"]["input_size"] == 224
    assert summary["layers"][0]["shape"] == [64, 111, 111]  # conv 3x3 stride 2 on 224 px
    assert "features.0: 64 units" in capsys.readouterr().out

    # MODEL 'torchvision:NAME' (and DEFAULT, the same entry) is the same dissection: reused
    assert main(run_args(tiny, out, "torchvision:squeezenet1_1", "--weights", "DEFAULT")) == 0
    assert "reusing" in capsys.readouterr().out
    # the report's psi maps rebuild the model from the same weights (kind 'pretrained')
    assert main(["report", str(out), "--psi-units", "features.0:0"]) == 0
    assert (out / "report" / "figures" / "psi-features.0-unit0000.png").is_file()


@pytest.mark.parametrize("model", [None, "torchvision:squeezenet1_1"])
def test_python_api_with_weights(installed, tiny, tmp_path, model):
    import dissect

    path, digest, _ = installed
    out = tmp_path / "api"
    dissect.run(model, str(tiny), out, arch="squeezenet1_1" if model is None else None, weights="IMAGENET1K_V1",
                layers=["features.0"], device="cpu", quiet=True, cache_dir=str(tmp_path / "cache"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["weights"]["sha256"] == digest and summary["model"]["arch"] == "torchvision:squeezenet1_1"


def test_loaded_weights_are_the_files_and_flags_override_the_weights_preprocessing(installed):
    path, digest, state = installed
    loaded = load_requested(None, arch="squeezenet1_1", weights="SqueezeNet1_1_Weights.IMAGENET1K_V1")
    got = loaded.module.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert not loaded.module.training
    forced = load_requested(None, arch="torchvision:squeezenet1_1", weights="DEFAULT", normalize="lite",
                            input_size=112)
    assert forced.normalization == NORMALIZATIONS["lite"] and forced.input_size == 112
    assert forced.native_input_size == 224
    pre = forced.describe()["preprocessing"]
    assert (pre["normalization_from"], pre["input_size_from"]) == ("--normalize", "--input-size")


def test_missing_file_exits_2_naming_the_path_without_a_download(hub, tiny, tmp_path, capsys):
    out = tmp_path / "missing"
    assert main(run_args(tiny, out, "--arch", "squeezenet1_1", "--weights", "IMAGENET1K_V1")) == 2
    err = capsys.readouterr().err
    expected = hub / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    assert str(expected) in err and "no network" in err and PUBLISHED_URL in err
    assert not (out / "summary.json").exists()


def test_hash_mismatch_is_refused(hub, tiny, tmp_path, capsys):
    path = hub / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    random_weights(path)  # not the published bytes
    assert main(run_args(tiny, tmp_path / "bad", "--arch", "squeezenet1_1", "--weights", "IMAGENET1K_V1")) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "does not start with b8a52dc0" in err


def test_bad_requests_say_what_is_expected(installed, tmp_path):
    path, _, _ = installed
    with pytest.raises(InputError, match="valid: IMAGENET1K_V1, DEFAULT"):
        load_requested(None, arch="squeezenet1_1", weights="IMAGENET1K_V2")
    with pytest.raises(InputError, match="another model"):
        load_requested(None, arch="squeezenet1_1", weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(InputError, match="needs --arch"):
        load_requested(None, weights="DEFAULT")
    with pytest.raises(InputError, match="takes no MODEL file"):
        load_requested(str(path), arch="squeezenet1_1", weights="DEFAULT")
    with pytest.raises(InputError, match="not a torchvision classification model"):
        load_requested(None, arch="tiny_cnn", weights="DEFAULT")
    with pytest.raises(InputError, match="torchvision's pretrained weights only"):
        load_requested(None, arch="cgl:alexnet", weights="DEFAULT")
    with pytest.raises(InputError, match="add --weights"):
        load_requested("torchvision:squeezenet1_1")
    with pytest.raises(InputError, match="different architectures"):
        load_requested("torchvision:squeezenet1_1", arch="resnet18", weights="DEFAULT")
    with pytest.raises(InputError, match="MODEL: missing"):
        load_requested(None)


def test_dissect_layers_with_weights(installed, capsys):
    assert main(["layers", "--arch", "squeezenet1_1", "--weights", "DEFAULT"]) == 0
    out = capsys.readouterr().out
    assert "pretrained" in out and "input 224x224" in out and "features.0" in out


def test_densenet_files_keep_their_old_key_names():
    old = {"features.denseblock1.denselayer1.norm.1.weight": torch.zeros(1),
           "features.denseblock1.denselayer1.conv.2.weight": torch.zeros(1), "classifier.bias": torch.zeros(1)}
    assert list(renamed_keys("densenet121", old)) == ["features.denseblock1.denselayer1.norm1.weight",
                                                       "features.denseblock1.denselayer1.conv2.weight",
                                                       "classifier.bias"]
    assert list(renamed_keys("resnet18", old)) == list(old)


# ---------------------------------------------------------------- timm (optional extra)

def test_timm_arch_without_timm_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, installed or not
    path = tmp_path / "sd.pth"
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, path)
    with pytest.raises(InputError, match=r"needs the timm package.*concept-dissect\[timm\]"):
        load_requested(str(path), arch="timm:resnet10t")


def timm_checkpoint(path: Path, timm, **args) -> dict[str, torch.Tensor]:
    """A checkpoint as timm's train.py saves it: state_dict, arch, args (a Namespace), epoch, version."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    state = model.state_dict()
    fields = {"model": "resnet10t", "num_classes": 5, "input_size": None, "img_size": None, "mean": None,
              "std": None, **args}
    torch.save({"epoch": 3, "arch": "resnet10t", "state_dict": state, "version": 2,
                "args": argparse.Namespace(**fields)}, path)
    return state


def test_timm_checkpoint_loads_with_its_config(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (optional extra: pip install "
                                              "'concept-dissect[timm]')")
    path = tmp_path / "timm.pth"
    state = timm_checkpoint(path, timm)
    loaded = load_requested(str(path), arch="timm:resnet10t")
    got = loaded.module.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state) and loaded.arch == "timm:resnet10t"
    cfg = loaded.module.pretrained_cfg
    assert loaded.native_input_size == cfg["input_size"][1] and loaded.input_size == loaded.native_input_size
    assert loaded.normalization == {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    assert loaded.origins == {"normalization": "timm config", "input_size": "timm config"}

    # the training run's own size and mean/std (train.py --img-size/--mean/--std) win over the config
    timm_checkpoint(path, timm, img_size=160, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    trained = load_requested(str(path), arch="timm:resnet10t")
    assert trained.native_input_size == 160 and trained.normalization == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert trained.origins["input_size"] == "timm train.py args"
    with pytest.raises(InputError, match="unknown timm architecture 'no_such_net'"):
        load_requested(str(path), arch="timm:no_such_net")
