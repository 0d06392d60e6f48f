"""Model loading in every form, and the `dissect layers` command."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from broden.errors import InputError
from dissect.checkpoint import make_checkpoint, save_checkpoint
from dissect.cli import main
from dissect.models import (NORMALIZATIONS, conv_layer_names, default_layers, load_model,
                            model_from_module)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 5, 1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _squeezenet(num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.squeezenet1_1(weights=None, num_classes=num_classes)


class _Marker:
    """Unpickling this calls open(path, 'w'): proof of whether the loader ran code from the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------ normalisations

def test_normalizations_match_the_contract():
    assert NORMALIZATIONS["imagenet"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    lite = NORMALIZATIONS["lite"]  # NetDissect-Lite's constants exactly (feature_operation.py, settings)
    assert [m * 255 for m in lite["mean"]] == [124.6901, 118.6897, 109.5388]
    assert [s * 255 for s in lite["std"]] == [255 * 0.224] * 3
    assert NORMALIZATIONS["none"] == {"mean": [0.0] * 3, "std": [1.0] * 3}


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_of_a_cgl_model_round_trips(tmp_path):
    from cgl_train.models import build_model
    torch.manual_seed(1)
    kwargs = {"num_classes": 3, "input_size": 16, "width1": 4, "width2": 6}
    model = build_model("tiny_cnn", **kwargs)
    groups = {"conv1": {"groups": 2, "free": 0, "channels": 4}, "conv2": {"groups": 3, "free": 0, "channels": 6}}
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(), groups=groups,
                           normalization=NORMALIZATIONS["lite"], input_size=16, metrics={"val_acc": 0.75},
                           seed=3)
    path = save_checkpoint(ckpt, tmp_path / "tiny.pth")

    loaded = load_model(path)  # no flag: the checkpoint's normalisation
    assert loaded.kind == "checkpoint" and loaded.arch == "tiny_cnn"
    assert loaded.fingerprint == _sha256(path)
    assert loaded.normalization == NORMALIZATIONS["lite"]
    # an explicit --normalize wins over the checkpoint's (with a warning), and is what describe() records
    forced = load_model(path, normalize="none")
    assert forced.normalization == NORMALIZATIONS["none"] and forced.describe()["normalization"] == NORMALIZATIONS["none"]
    assert loaded.input_size == 16 and loaded.metrics == {"val_acc": 0.75}
    assert loaded.groups == groups and default_layers(loaded) == ["conv1", "conv2"]
    assert loaded.checkpoint["seed"] == 3
    assert not loaded.module.training
    assert _same_weights(loaded.module, model)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    assert torch.equal(loaded.module(x), model(x))
    # an explicit --input-size overrides the checkpoint's
    assert load_model(path, input_size=32).input_size == 32


def test_checkpoint_with_a_torchvision_arch(tmp_path):
    model = _squeezenet(4)
    ckpt = make_checkpoint(arch="squeezenet1_1", arch_kwargs={"num_classes": 4}, state_dict=model.state_dict(),
                           groups={}, normalization=NORMALIZATIONS["imagenet"], input_size=None)
    path = save_checkpoint(ckpt, tmp_path / "sq.pth")
    loaded = load_model(path)
    assert loaded.kind == "checkpoint" and loaded.arch == "squeezenet1_1" and loaded.metrics is None
    assert _same_weights(loaded.module, model)
    # no groups: every Conv2d, counted here independently by type
    expected = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    assert default_layers(loaded) == expected and len(expected) == 26


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = _squeezenet(4)
    good = dict(arch="squeezenet1_1", arch_kwargs={"num_classes": 4}, state_dict=model.state_dict(),
                groups={}, normalization=NORMALIZATIONS["imagenet"], input_size=None)
    path = save_checkpoint(make_checkpoint(**good), tmp_path / "a.pth")
    with pytest.raises(InputError, match="--arch resnet18.*squeezenet1_1"):
        load_model(path, arch="resnet18")
    # arch_kwargs that disagree with the weights: the message names the mismatching key
    bad = save_checkpoint(make_checkpoint(**{**good, "arch_kwargs": {"num_classes": 5}}), tmp_path / "b.pth")
    with pytest.raises(InputError, match=r"b\.pth.*classifier\.1\.weight"):
        load_model(bad)
    ghost = save_checkpoint(make_checkpoint(**{**good, "groups": {"features.99": {"groups": 2}}}),
                            tmp_path / "c.pth")
    with pytest.raises(InputError, match="features.99"):
        load_model(ghost)
    # a required field missing: named
    raw = make_checkpoint(**good)
    del raw["input_size"]
    torch.save(raw, tmp_path / "d.pth")
    with pytest.raises(InputError, match="input_size"):
        load_model(tmp_path / "d.pth")


# ------------------------------------------------------------------ state_dicts

@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "under_state_dict", "under_model"])
def test_state_dict_forms_infer_num_classes(tmp_path, wrap):
    torch.manual_seed(2)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=7)
    sd = model.state_dict()
    if wrap == "module_prefix":  # as saved from DataParallel / DDP
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "under_state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif wrap == "under_model":
        obj = {"model": sd, "epoch": 3}
    else:
        obj = sd
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    loaded = load_model(path, arch="shufflenet_v2_x0_5", normalize="lite", input_size=32)
    assert loaded.kind == "state_dict" and loaded.arch == "shufflenet_v2_x0_5"
    assert loaded.module.fc.out_features == 7  # inferred from fc.weight (7, 1024)
    assert _same_weights(loaded.module, model)
    assert loaded.normalization == NORMALIZATIONS["lite"]
    assert loaded.input_size == 32 and loaded.groups == {} and loaded.fingerprint == _sha256(path)


def test_state_dict_needs_arch_and_a_fitting_one(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_squeezenet(3).state_dict(), path)
    with pytest.raises(InputError, match=r"w\.pth.*--arch"):
        load_model(path)
    with pytest.raises(InputError, match="unknown architecture 'not_a_net'.*resnet18"):
        load_model(path, arch="not_a_net")
    with pytest.raises(InputError, match="do not fit architecture 'resnet18'.*missing keys.*conv1.weight"):
        load_model(path, arch="resnet18")
    with pytest.raises(InputError, match="--num-classes 5.*3 outputs"):
        load_model(path, arch="squeezenet1_1", num_classes=5)
    assert main(["layers", str(path), "--arch", "squeezenet1_1", "--num-classes", "5"]) == 2  # a real flag
    with pytest.raises(InputError, match="unknown normalisation 'bgr'.*imagenet, lite, none"):
        load_model(path, arch="squeezenet1_1", normalize="bgr")
    with pytest.raises(InputError, match="--input-size"):
        load_model(path, arch="squeezenet1_1", input_size=0)
    loaded = load_model(path, arch="squeezenet1_1")  # default normalisation: imagenet
    assert loaded.normalization == NORMALIZATIONS["imagenet"]
    assert loaded.module.classifier[1].out_channels == 3  # a 1x1-conv classifier, also inferred


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(InputError, match="nope.pth: no such model file"):
        load_model(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(InputError, match="junk.pth"):
        load_model(junk)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pth")
    with pytest.raises(InputError, match=r"other\.pth: holds a dict with keys \['epoch', 'lr'\]"):
        load_model(tmp_path / "other.pth")


# ------------------------------------------------------------------ TorchScript and pickles

def _scripted_squeezenet(path: Path, num_classes: int = 3) -> nn.Module:
    net = _squeezenet(num_classes, seed=4).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(path))
    return net


def test_torchscript_with_arch_loads_into_the_eager_model(tmp_path):
    from dissect.hooks import LayerRecorder

    net = _scripted_squeezenet(tmp_path / "sq.ts")
    loaded = load_model(tmp_path / "sq.ts", arch="squeezenet1_1")
    assert loaded.kind == "torchscript" and loaded.arch == "squeezenet1_1"
    assert loaded.fingerprint == _sha256(tmp_path / "sq.ts")
    assert not isinstance(loaded.module, torch.jit.ScriptModule)  # eager: hooks work
    assert _same_weights(loaded.module, net)
    x = torch.rand(1, 3, 48, 48)
    with LayerRecorder(loaded.module, ["features.3.squeeze"]) as rec:
        got = rec.forward(x)["features.3.squeeze"]
    with torch.no_grad():
        expected = net.features[3].squeeze(net.features[:3](x))  # the conv's own output, before its ReLU
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(InputError, match="do not fit architecture 'resnet18'"):
        load_model(tmp_path / "sq.ts", arch="resnet18")


def test_cli_layers_on_torchscript(tmp_path, capsys):
    _scripted_squeezenet(tmp_path / "sq.ts")
    assert main(["layers", str(tmp_path / "sq.ts"), "--arch", "squeezenet1_1", "--input-size", "64"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows["features.0"][1] == "(64, 31, 31)"  # (64 - 3) // 2 + 1, as for the state_dict
    assert main(["layers", str(tmp_path / "sq.ts")]) == 0  # names only, and says why
    out = capsys.readouterr().out
    assert "features.0" in out and "--arch" in out and "(64, 31, 31)" not in out
    assert main(["run", str(tmp_path / "sq.ts"), "--dataset", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "TorchScript" in capsys.readouterr().err


def test_arch_prefix_picks_the_registry(tmp_path):
    from dissect.models import _build_arch

    # alexnet exists in both registries: cgl_train's has out-of-place ReLUs, torchvision's in-place ones
    assert _build_arch("alexnet", {"num_classes": 2}, "x", prefer="torchvision").features[1].inplace is True
    assert _build_arch("cgl:alexnet", {"num_classes": 2}, "x", prefer="torchvision").features[1].inplace is False
    assert _build_arch("torchvision:alexnet", {"num_classes": 2}, "x").features[1].inplace is True
    # through load_model, on a small state_dict
    path = tmp_path / "sq.pth"
    torch.save(_squeezenet(3).state_dict(), path)
    loaded = load_model(path, arch="torchvision:squeezenet1_1")
    assert loaded.module.classifier[1].out_channels == 3
    with pytest.raises(InputError, match="unknown architecture 'squeezenet1_1' in cgl_train"):
        load_model(path, arch="cgl:squeezenet1_1")
    with pytest.raises(InputError, match="--arch keras:alexnet: expected NAME, torchvision:NAME, cgl:NAME or timm:NAME"):
        load_model(path, arch="keras:alexnet")


def test_torchscript_round_trip(tmp_path):
    net = _tiny_net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        torch.jit.script(net).save(str(tmp_path / "net.ts"))
    # forward hooks are refused on scripted modules: dissecting one needs --arch
    with pytest.raises(InputError, match=r"net\.ts: is a TorchScript archive.*forward hooks.*--arch NAME"):
        load_model(tmp_path / "net.ts")
    loaded = load_model(tmp_path / "net.ts", normalize="none", input_size=8, allow_script=True)
    assert loaded.kind == "torchscript" and loaded.arch is None
    assert loaded.fingerprint == _sha256(tmp_path / "net.ts")
    assert loaded.normalization == NORMALIZATIONS["none"] and loaded.input_size == 8
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(loaded.module(x), net(x), atol=1e-6)
    assert conv_layer_names(loaded.module) == ["0", "2.0"]


def test_pickled_module_refused_unless_trusted(tmp_path):
    net = _tiny_net().eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(InputError) as err:
        load_model(path)
    msg = str(err.value)
    assert "whole.pt" in msg and "--trust-pickle" in msg and "arbitrary code" in msg
    assert "torch.nn.modules.container.Sequential" in msg
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle" and not loaded.module.training
    assert _same_weights(loaded.module, net)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(loaded.module(x), net(x))


def test_refused_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Marker(str(marker))}, path)
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(path)
    assert not marker.exists()
    # the fixture is a real payload: trusting the file runs it
    with pytest.raises(InputError, match="payload"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        load_model(path, trust_pickle=True)
    assert marker.exists()


# ------------------------------------------------------------------ in-memory modules and layer lists

def test_model_from_module_and_layer_names():
    net = _tiny_net()
    loaded = model_from_module(net, normalization="lite", input_size=8, groups={"2.0": {"groups": 5}})
    assert loaded.kind == "module" and loaded.source == "<memory>" and not net.training
    assert loaded.normalization == NORMALIZATIONS["lite"]
    assert conv_layer_names(net) == ["0", "2.0"] and default_layers(loaded) == ["2.0"]
    assert default_layers(model_from_module(net)) == ["0", "2.0"]
    # fingerprint: same weights, same hash; one changed value, another hash
    assert model_from_module(_tiny_net()).fingerprint == loaded.fingerprint
    other = _tiny_net()
    with torch.no_grad():
        other[5].bias[0] += 1
    assert model_from_module(other).fingerprint != loaded.fingerprint
    # the hashed bytes are fixed: run keys (and so resumable states) survive the code that reads them
    want = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        want.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode() + t.contiguous().numpy().tobytes())
    assert loaded.fingerprint == want.hexdigest()
    with pytest.raises(InputError, match="groups.*layer9"):
        model_from_module(net, groups={"layer9": {"groups": 2}})


# ------------------------------------------------------------------ dissect layers

def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in ("Conv2d", "Sequential", "ReLU", "MaxPool2d", "Fire", "Dropout",
                                            "AdaptiveAvgPool2d"):
            rows[parts[0]] = parts[1:]
    return rows


def test_cli_layers_lists_names_and_shapes(tmp_path, capsys):
    path = tmp_path / "sq.pth"
    torch.save(_squeezenet(3).state_dict(), path)
    assert main(["layers", str(path), "--arch", "squeezenet1_1", "--input-size", "64"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 26 and all(t == "Conv2d" for t, _ in rows.values())
    # by hand: 3x3 stride-2 conv: (64 - 3) // 2 + 1 = 31; three ceil-mode 3x3/2 pools: 31 -> 15 -> 7 -> 3
    assert rows["features.0"][1] == "(64, 31, 31)"
    assert rows["features.3.squeeze"][1] == "(16, 15, 15)"
    assert rows["features.12.expand3x3"][1] == "(256, 3, 3)"
    assert rows["classifier.1"][1] == "(3, 3, 3)"

    assert main(["layers", str(path), "--arch", "squeezenet1_1", "--input-size", "64", "--all"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows["features"] == ["Sequential", "(512, 3, 3)"]
    assert rows["features.2"] == ["MaxPool2d", "(64, 15, 15)"]


def test_cli_layers_uses_checkpoint_input_size(tmp_path, capsys):
    model = _squeezenet(2)
    ckpt = make_checkpoint(arch="squeezenet1_1", arch_kwargs={"num_classes": 2}, state_dict=model.state_dict(),
                           groups={"features.0": {"groups": 4, "free": 0, "channels": 64}},
                           normalization=NORMALIZATIONS["none"], input_size=33)
    path = save_checkpoint(ckpt, tmp_path / "c.pth")
    assert main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input 33x33" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("features.0 "))
    assert line.split()[1:] == ["Conv2d", "(64,", "16,", "16)", "4"]  # (33 - 3) // 2 + 1 = 16; 4 groups


def test_cli_layers_exit_codes(tmp_path, capsys):
    assert main(["layers", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: no such model file" in capsys.readouterr().err
    path = tmp_path / "sd.pth"
    torch.save(_tiny_net().state_dict(), path)
    assert main(["layers", str(path)]) == 2
    assert "--arch" in capsys.readouterr().err
