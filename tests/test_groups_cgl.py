"""Tests for cgl_train.groups: group configs, BN lookup and the activation hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from broden.errors import InputError
from dissect.models import conv_layer_names
from cgl_train.groups import (GroupActivations, GroupSpec, LayerGroups, build_layer_groups,
                              find_following_bn, layer_groups_config)


class TinyNet(nn.Module):
    """conv -> BN -> inplace ReLU -> conv -> inplace ReLU -> pool -> linear (AlexNet-B style)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BN affine parameters
        model.features[1].weight.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5, 0.3, 1.0]))
        model.features[1].bias.copy_(torch.linspace(-0.5, 0.5, 6))
    return model


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- GroupSpec

def test_group_spec_remainder_is_free():
    spec = GroupSpec(channels=10, groups=3)
    assert (spec.size, spec.free, spec.grouped) == (3, 1, 9)
    assert spec.group_slices() == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert spec.index().tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert spec.index().dtype == torch.int64


def test_group_spec_explicit_free():
    spec = GroupSpec(channels=10, groups=3, free=4)
    assert (spec.size, spec.free) == (2, 4)
    assert spec.index().tolist() == [[0, 1], [2, 3], [4, 5]]
    assert spec == GroupSpec(10, 3, 4)
    assert GroupSpec(10, 3) == GroupSpec(10, 3, 1)  # None resolves to the remainder


def test_group_spec_bad_free_names_the_layer():
    with pytest.raises(InputError, match="features.3.*divisible"):
        GroupSpec(channels=10, groups=3, free=2, layer="features.3")
    with pytest.raises(InputError, match="conv1"):
        GroupSpec(channels=4, groups=5, layer="conv1")  # fewer channels than groups
    with pytest.raises(InputError, match="groups"):
        GroupSpec(channels=4, groups=0)


def test_group_spec_dict_round_trip():
    spec = GroupSpec(channels=128, groups=5)
    data = spec.to_dict()
    assert data == {"groups": 5, "free": 3, "channels": 128}
    assert GroupSpec.from_dict(data) == spec
    with pytest.raises(InputError, match="conv2.*'groups'"):
        GroupSpec.from_dict({"channels": 8}, layer="conv2")
    with pytest.raises(InputError, match="unknown"):
        GroupSpec.from_dict({"channels": 8, "groups": 2, "size": 4})


# ---------------------------------------------------------------- BN lookup and config

def test_find_following_bn():
    model = _model()
    assert find_following_bn(model, "features.0") == "features.1"
    assert find_following_bn(model, "features.3") is None  # followed by a ReLU
    with pytest.raises(InputError, match="features.0, features.3"):
        find_following_bn(model, "features.2")  # a ReLU, not a conv: lists the valid names


def test_build_layer_groups_and_config():
    model = _model()
    layers = build_layer_groups(model, {"features.0": {"groups": 3}, "features.3": {"groups": 3, "free": 2}})
    assert [(lg.name, lg.spec.size, lg.spec.free, lg.bn) for lg in layers] == [
        ("features.0", 2, 0, "features.1"), ("features.3", 2, 2, None)]
    assert layer_groups_config(layers) == {"features.0": {"groups": 3, "free": 0, "channels": 6},
                                           "features.3": {"groups": 3, "free": 2, "channels": 8}}
    assert [lg.bn for lg in build_layer_groups(model, {"features.0": {"groups": 3}}, use_bn=False)] == [None]
    with pytest.raises(InputError, match="features.3.*7 channels.*8"):
        build_layer_groups(model, {"features.3": {"groups": 1, "channels": 7}})


# ---------------------------------------------------------------- GroupActivations

def test_captures_match_a_manual_forward():
    model = _model().train()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    layers = [LayerGroups("features.0", GroupSpec(6, 3), bn="features.1"),
              LayerGroups("features.3", GroupSpec(8, 2))]
    # manual forward, layer by layer, without inplace ops
    f = model.features
    bn_out = f[1](f[0](x))
    conv2_out = f[3](torch.relu(bn_out))
    with GroupActivations(model, layers) as acts:
        assert _hook_count(model) == 2
        model(x)
        cap = acts.captured
    assert set(cap) == {"features.0", "features.3"}
    # BN running stats were updated twice, but train-mode outputs use batch stats: equal
    torch.testing.assert_close(cap["features.0"].pre, bn_out)
    assert cap["features.0"].gamma is model.features[1].weight
    # the pre-activation, not the inplace-ReLU'd map: it has negative values
    torch.testing.assert_close(cap["features.3"].pre, conv2_out)
    assert (cap["features.3"].pre < 0).any()
    assert cap["features.3"].gamma is None
    assert _hook_count(model) == 0


def test_captures_carry_gradients_to_the_weights():
    model = _model()
    layers = [LayerGroups("features.3", GroupSpec(8, 2))]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with GroupActivations(model, layers) as acts:
        model(x)
        acts.captured["features.3"].pre.square().sum().backward()
    grad = model.features[3].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_clear_and_disable():
    model = _model()
    layers = [LayerGroups("features.3", GroupSpec(8, 2))]
    x = torch.randn(1, 3, 4, 4)
    with GroupActivations(model, layers) as acts:
        model(x)
        acts.clear()
        assert acts.captured == {}
        acts.enabled = False
        model(x)
        assert acts.captured == {}


def test_hooks_removed_after_exception():
    model = _model()
    layers = [LayerGroups("features.0", GroupSpec(6, 3), bn="features.1"),
              LayerGroups("features.3", GroupSpec(8, 2))]
    with pytest.raises(RuntimeError, match="boom"):
        with GroupActivations(model, layers):
            model(torch.randn(1, 3, 4, 4))
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_unknown_names_list_valid_ones():
    model = _model()
    with pytest.raises(InputError, match=r"'features\.9'.*features\.0, features\.3"):
        GroupActivations(model, [LayerGroups("features.9", GroupSpec(8, 2))])
    with pytest.raises(InputError, match=r"batch-norm 'features\.2'.*features\.1"):
        GroupActivations(model, [LayerGroups("features.0", GroupSpec(6, 3), bn="features.2")])
    with pytest.raises(InputError, match="5 channels.*6"):
        GroupActivations(model, [LayerGroups("features.0", GroupSpec(5, 1))])
    assert _hook_count(model) == 0
    assert conv_layer_names(model) == ["features.0", "features.3"]


def test_no_copy_detects_inplace_overwrite():
    model = _model()
    with GroupActivations(model, [LayerGroups("features.3", GroupSpec(8, 2))], copy=False) as acts:
        model(torch.randn(1, 3, 4, 4))
        with pytest.raises(RuntimeError, match="in place"):
            acts.captured
