"""LayerRecorder and layer_shapes: nested names, hook hygiene, early stop."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from broden.errors import InputError
from dissect.hooks import LayerRecorder, layer_shapes


class _Counter(nn.Module):
    """Identity that counts its calls: shows whether the forward pass got this far."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def _tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Sequential(nn.Conv2d(4, 5, 1), nn.ReLU()), _Counter()).eval()


def _no_hooks_left(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_nested_resnet_layer_matches_manual_forward(resnet18):
    m = resnet18
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h = m.layer3(m.layer2(m.layer1(h)))
        block0 = m.layer4[0](h)
        b = m.layer4[1]
        expected_conv2 = b.conv2(b.relu(b.bn1(b.conv1(block0))))  # (2, 512, 1, 1)
        with LayerRecorder(m, ["layer4.1.conv2", "layer2.0.downsample.0"]) as rec:
            m(x)
        expected_down = m.layer2[0].downsample[0](m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
    assert set(rec.outputs) == {"layer4.1.conv2", "layer2.0.downsample.0"}
    assert rec.outputs["layer4.1.conv2"].shape == (2, 512, 1, 1)
    assert torch.allclose(rec.outputs["layer4.1.conv2"], expected_conv2, atol=1e-5)
    assert torch.allclose(rec.outputs["layer2.0.downsample.0"], expected_down, atol=1e-5)
    assert _no_hooks_left(m)


def test_alexnet_conv_outputs_survive_inplace_relu(alexnet):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 63, 63)  # AlexNet's smallest input
    with torch.no_grad():
        with LayerRecorder(alexnet, ["features.10", "features.0"]) as rec:
            alexnet(x)
        conv5 = alexnet.features[:11](x)
        conv1 = alexnet.features[0](x)
    # torchvision's ReLU(inplace=True) follows each conv: the recorded map must stay pre-ReLU
    assert (conv1 < 0).any() and torch.equal(rec.outputs["features.0"], conv1)
    assert torch.allclose(rec.outputs["features.10"], conv5, atol=1e-5)
    assert rec.outputs["features.10"].dtype == torch.float32 and not rec.outputs["features.10"].requires_grad


def test_outputs_are_float32_and_detached():
    net = _tiny_net().double()
    x = torch.rand(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with LayerRecorder(net, ["2.0"]) as rec:
        y = net(x)
    out = rec.outputs["2.0"]
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.allclose(out, net[2][0](net[1](net[0](x))).detach().float())
    assert y.requires_grad  # the model's own graph is untouched


def test_unknown_layer_fails_before_any_work():
    net = _tiny_net()
    with pytest.raises(InputError) as err:
        LayerRecorder(net, ["0", "2.1", "conv9"])
    # only conv9 is unknown ('2.1' is the nested ReLU); every valid name is listed
    assert str(err.value) == "--layers: unknown layer 'conv9' in Sequential; valid names: 0, 1, 2, 2.0, 2.1, 3"
    assert net[3].calls == 0 and _no_hooks_left(net)


def test_unknown_layer_suggests_close_match(resnet18):
    with pytest.raises(InputError, match=r"'layer4\.1\.conv3' \(did you mean 'layer4\.1\.conv.'"):
        LayerRecorder(resnet18, ["layer4.1.conv3"])
    with pytest.raises(InputError, match="dissect layers MODEL --all"):  # too many names to list them all
        LayerRecorder(resnet18, ["fc2"])
    with pytest.raises(InputError, match="no layer names"):
        LayerRecorder(resnet18, [])


def test_hooks_removed_after_exception_in_block():
    net = _tiny_net()
    with pytest.raises(RuntimeError, match="boom"):
        with LayerRecorder(net, ["0", "2.0"]):
            assert not _no_hooks_left(net)  # they were there
            net(torch.rand(1, 3, 4, 4))
            raise RuntimeError("boom")
    assert _no_hooks_left(net)


def test_hooks_removed_after_exception_inside_forward():
    net = _tiny_net()
    with pytest.raises(RuntimeError):
        with LayerRecorder(net, ["0"]):
            net(torch.rand(1, 5, 4, 4))  # wrong channel count: fails inside the model
    assert _no_hooks_left(net)


def test_stop_after_last_gives_identical_outputs_and_skips_the_rest():
    net = _tiny_net()
    x = torch.rand(2, 3, 6, 6)
    with LayerRecorder(net, ["2.0", "0"]) as full:
        net(x)
    assert net[3].calls == 1
    reached_end = False
    with LayerRecorder(net, ["2.0", "0"], stop_after_last=True) as early:
        net(x)
        reached_end = True  # skipped: the stop unwinds the whole block
    assert not reached_end and net[3].calls == 1  # the layer after 2.0 never ran
    assert early.outputs.keys() == full.outputs.keys()
    assert all(torch.equal(early.outputs[k], full.outputs[k]) for k in full.outputs)
    assert _no_hooks_left(net)


def test_forward_helper_stops_per_call():
    net = _tiny_net()
    xs = [torch.rand(1, 3, 4, 4) for _ in range(3)]
    got = []
    with LayerRecorder(net, ["0"], stop_after_last=True) as rec:
        for x in xs:
            got.append(rec.forward(x)["0"])
    assert net[3].calls == 0
    assert all(torch.equal(g, net[0](x).detach()) for g, x in zip(got, xs))


def test_non_tensor_output_is_a_clear_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0]

    net = Net()
    with pytest.raises(InputError, match="'pair'.*tuple.*expected a tensor"):
        with LayerRecorder(net, ["pair"]):
            net(torch.zeros(1, 3, 2, 2))
    assert _no_hooks_left(net)


def test_layer_shapes_alexnet(alexnet):
    alexnet.train()  # layer_shapes must not leave the model in another mode
    alexnet.features[0].eval()
    shapes = layer_shapes(alexnet, ["features.0", "features.3", "features.10", "classifier.6"], (224, 224))
    # by hand: conv1 11x11/4 pad 2: (224 + 4 - 11) // 4 + 1 = 55; 3x3/2 pools: 55 -> 27 -> 13
    assert shapes == {"features.0": (64, 55, 55), "features.3": (192, 27, 27),
                      "features.10": (256, 13, 13), "classifier.6": (1000,)}
    assert alexnet.training and alexnet.classifier[0].training and not alexnet.features[0].training
    alexnet.eval()
    assert layer_shapes(alexnet, ["features.0"], (100, 80)) == {"features.0": (64, 24, 19)}


def test_layer_shapes_layer_that_never_runs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.unused = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

    net = Net()
    with pytest.raises(InputError, match="unused.*did not run"):
        layer_shapes(net, ["conv", "unused"], (4, 4))
    assert layer_shapes(net, ["conv", "unused"], (4, 4), strict=False) == {"conv": (4, 4, 4)}


def test_torchscript_hooks_are_refused_clearly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Sequential(nn.Conv2d(2, 2, 1))))
    rec = LayerRecorder(scripted, ["1.0"])  # nested names resolve on TorchScript modules
    assert rec.names == ["1.0"]
    with pytest.raises(InputError, match="TorchScript.*forward hooks.*state_dict"):
        with rec:
            scripted(torch.zeros(1, 3, 2, 2))
