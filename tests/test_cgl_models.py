"""cgl_train.models: architectures, registry errors and default grouped layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from broden.errors import InputError
from cgl_train.groups import GroupActivations
from cgl_train.models import MODELS, build_model, default_group_layers


def test_tiny_cnn_matches_the_papers_network_computed_by_hand():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=3, input_size=16).eval()
    # the paper's widths are the defaults
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (3, 128, (3, 3))
    assert (model.conv2.in_channels, model.conv2.out_channels, model.conv2.kernel_size) == (128, 256, (3, 3))
    assert (model.fc.in_features, model.fc.out_features) == (256, 3)
    x = torch.randn(2, 3, 16, 16)
    a = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1))
    a = F.max_pool2d(a, 2)
    a = F.relu(F.conv2d(a, model.conv2.weight, model.conv2.bias, padding=1))
    expected = a.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_alexnet_b_has_a_batchnorm_after_every_conv_before_its_relu():
    with torch.device("meta"):  # structure only: no time spent initialising 60M weights
        model = build_model("alexnet_b", num_classes=7, input_size=64)
    feats = list(model.features)
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for i in convs:
        assert isinstance(feats[i + 1], nn.BatchNorm2d)
        assert feats[i + 1].num_features == feats[i].out_channels
        assert isinstance(feats[i + 2], nn.ReLU)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64, device="meta")).shape == (1, 7)
    layers = default_group_layers("alexnet_b", model, groups=4)
    assert [lg.name for lg in layers] == [f"features.{i}" for i in convs]
    assert [lg.bn for lg in layers] == [f"features.{i + 1}" for i in convs]


def test_relus_are_not_inplace_so_the_captured_pre_activation_keeps_negative_values():
    torch.manual_seed(1)
    model = build_model("alexnet", num_classes=5, input_size=63).eval()
    with torch.no_grad():  # the smallest input still runs through the adaptive pool
        assert model(torch.zeros(1, 3, 63, 63)).shape == (1, 5)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    layers = default_group_layers("alexnet", model, groups=4)
    assert [lg.bn for lg in layers] == [None] * 5
    x = torch.randn(1, 3, 63, 63)
    with torch.no_grad(), GroupActivations(model, layers[:1], copy=False) as acts:
        model(x)
        pre = acts.captured["features.0"].pre
    conv = model.features[0]
    expected = F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2)
    assert torch.allclose(pre, expected, atol=1e-5)
    assert (pre < 0).any()


def test_vgg16_groups_all_thirteen_convs_by_default():
    with torch.device("meta"):
        model = build_model("vgg16", num_classes=4, input_size=32)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32, device="meta")).shape == (1, 4)
    layers = default_group_layers("vgg16", model, groups=8)
    assert len(layers) == 13
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [lg.spec.channels for lg in layers] == [c.out_channels for c in convs]
    assert all(lg.spec.size == c.out_channels // 8 for lg, c in zip(layers, convs))


def test_default_group_layers_with_overrides_and_free_filters():
    model = build_model("tiny_cnn", num_classes=2, width1=10, width2=16)
    layers = default_group_layers("tiny_cnn", model, groups=3, group_overrides={"conv2": 4},
                                  free_overrides={"conv2": 4})
    by_name = {lg.name: lg.spec for lg in layers}
    assert list(by_name) == ["conv1", "conv2"]
    # conv1: 10 channels in 3 groups -> f = 3, 1 free (the remainder)
    assert (by_name["conv1"].groups, by_name["conv1"].size, by_name["conv1"].free) == (3, 3, 1)
    # conv2: 16 - 4 free = 12 in 4 groups -> f = 3
    assert (by_name["conv2"].groups, by_name["conv2"].size, by_name["conv2"].free) == (4, 3, 4)
    only = default_group_layers("tiny_cnn", model, groups=2, layers=["conv2"])
    assert [lg.name for lg in only] == ["conv2"]


@pytest.mark.parametrize("call, words", [
    (lambda: build_model("resnet9000"), ["resnet9000", "alexnet", "alexnet_b", "tiny_cnn", "vgg16"]),
    (lambda: build_model("alexnet", input_size=62), ["input_size", "63"]),
    (lambda: build_model("vgg16", input_size=31), ["input_size", "32"]),
    (lambda: build_model("tiny_cnn", widht1=3), ["tiny_cnn", "widht1"]),
    (lambda: default_group_layers("tiny_cnn", build_model("tiny_cnn", width1=4, width2=4), groups=2,
                                  layers=["fc"]), ["fc", "conv1", "conv2"]),
    (lambda: default_group_layers("tiny_cnn", build_model("tiny_cnn", width1=4, width2=4), groups=2,
                                  group_overrides={"conv3": 2}), ["conv3", "conv1"]),
    (lambda: default_group_layers("tiny_cnn", build_model("tiny_cnn", width1=4, width2=4), groups=5),
     ["conv1", "1..4"]),
])
def test_bad_names_and_sizes_raise_input_errors_that_say_what_is_valid(call, words):
    with pytest.raises(InputError) as err:
        call()
    for word in words:
        assert word in str(err.value)


def test_registry_names():
    assert sorted(MODELS) == ["alexnet", "alexnet_b", "tiny_cnn", "vgg16"]
