"""Concept groups: layouts, relevance (plain and BN-aware) and the aligned concept, against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from broden.errors import InputError
from dissect.groups import (concept_groups, equal_groups, following_bn, group_of_units, group_relevance,
                            layout_from_spec)
from dissect.labels import label_units

CATS = ["color", "object"]
LABEL_CAT = np.array([-1, 0, 0, 1])  # 1 red, 2 green (color); 3 car (object)
NAMES = ["-", "red", "green", "car"]


def test_layouts():
    lay = equal_groups(10, 3)
    assert (lay.size, lay.free) == (3, 1)
    assert group_of_units(lay).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, -1]
    lay = layout_from_spec({"groups": 2, "free": 2, "channels": 8}, 8)
    assert lay.units(1) == [3, 4, 5]
    with pytest.raises(InputError, match="divide"):
        layout_from_spec({"groups": 3, "free": 0}, 8, "conv1")
    with pytest.raises(InputError, match="declared for 16"):
        layout_from_spec({"groups": 2, "channels": 16}, 8, "conv1")


def test_relevance_plain_and_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0, 9.0]))
    lay = equal_groups(5, 2)  # groups {0,1}, {2,3}; channel 4 free
    beta, beta_bn = group_relevance(conv.weight, lay, bn)
    w = conv.weight.detach().double()
    for g, chans in enumerate([[0, 1], [2, 3]]):
        total = sum(float((w[c] ** 2).sum()) for c in chans)
        assert beta[g] == pytest.approx(math.sqrt(total))
        scaled = sum(float((w[c] ** 2).sum()) * float(bn.weight.detach()[c]) ** 2 / (float(bn.running_var[c]) + bn.eps)
                     for c in chans)
        assert beta_bn[g] == pytest.approx(math.sqrt(scaled))
    assert group_relevance(conv.weight, lay)[1] is None


def test_following_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())
    assert following_bn(model, "0") is model[1]
    assert following_bn(model, "3") is None
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert following_bn(nested, "0.0") is nested[0][1]


class _Block(nn.Module):
    """A non-Sequential block whose children list a BN after the conv that its forward never applies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bn(x.repeat(1, 2, 1, 1)[:, :4])


def test_following_bn_needs_a_sequential_parent_and_matching_channels():
    from reports.psi import psi_source

    block = nn.Sequential(_Block())
    # declaration order is not data flow: only a Sequential says the BN runs on the conv's output
    assert following_bn(block, "0.conv") is None
    assert psi_source(block, "0.conv") == ("std", None)  # the psi report applies the same rule
    wrong = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    assert following_bn(wrong, "0") is None  # a BN of another width cannot be this conv's
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert psi_source(seq, "0") == ("bn", "1") and following_bn(seq, "0") is seq[1]
    with pytest.raises(InputError, match="not a Conv2d"):
        following_bn(seq, "1")


def test_aligned_concept_by_hand():
    iou = np.array([
        [0, 0.30, 0.00, 0.00],   # group 0: two red detectors
        [0, 0.10, 0.00, 0.05],
        [0, 0.00, 0.01, 0.02],   # group 1: weak everywhere
        [0, 0.00, 0.00, 0.03],
    ])
    lab = label_units(iou, LABEL_CAT, CATS, 0.04, ">=")
    lay = equal_groups(4, 2)
    groups = concept_groups(lab, iou, LABEL_CAT, NAMES, lay, beta=np.array([1.0, 2.0]), alpha=0.5, threshold=0.3)
    # group 0: red = 0.5 * 2/2 + 0.5 * 0.2 = 0.6; car = 0.5 * 0 + 0.5 * 0.025 (unit 1's top is red 0.10)
    assert groups[0]["aligned_concept"] == "red" and groups[0]["aligned_category"] == "color"
    assert groups[0]["score"] == pytest.approx(0.6)
    assert groups[0]["detectors"] == {"red": 2}
    assert groups[0]["units"] == [0, 1] and groups[0]["relevance"] == 1.0 and groups[0]["relevance_bn"] is None
    # group 1: no detectors; best car = 0.5 * 0.025 < T: not aligned, but the score is reported
    assert groups[1]["aligned_concept"] is None and groups[1]["aligned_category"] is None
    assert groups[1]["score"] == pytest.approx(0.5 * 0.025)
    assert groups[1]["detectors"] == {}
    # alpha = 0: the mean IoU alone decides, and a low T aligns group 1 to car
    g1 = concept_groups(lab, iou, LABEL_CAT, NAMES, lay, alpha=0.0, threshold=0.02)[1]
    assert g1["aligned_concept"] == "car" and g1["score"] == pytest.approx(0.025)
