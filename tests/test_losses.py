"""Tests for cgl_train.losses against naive loop implementations and hand-computed values."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from broden.errors import InputError
from cgl_train.config import TrainConfig
from cgl_train.groups import Captured, GroupActivations, GroupSpec, LayerGroups
from dissect.groups import group_norms, group_norms_bn
from cgl_train.losses import (CGLObjective, CGLOptions, ReceptiveFieldScale, block_norm, cgl_terms,
                              group_activation_loss, proximal_group_step, sample_pairs, soft_iou_distance, soft_receptive_field,
                              soft_receptive_field_bn, spatial_loss)

D64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


# ---------------------------------------------------------------- naive references (explicit loops)

def naive_psi(pre: torch.Tensor, p1: float, p2: float, eps: float) -> torch.Tensor:
    n, c, h, w = pre.shape
    out = torch.empty_like(pre)
    for ch in range(c):
        values = [pre[i, ch, y, x] for i in range(n) for y in range(h) for x in range(w)]
        mean = sum(values) / len(values)
        std = torch.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for i, y, x in itertools.product(range(n), range(h), range(w)):
            out[i, ch, y, x] = 1 / (1 + torch.exp(-(p1 * pre[i, ch, y, x] / (std + eps) + p2)))
    return out


def naive_d(p: list[float], q: list[float]) -> float:
    diff = sum(abs(a - b) for a, b in zip(p, q))
    den = sum(abs(a) for a in p) + sum(abs(b) for b in q) + diff
    return 0.0 if den == 0 else 2 * diff / den


def naive_group_loss(psi: torch.Tensor, pairs: torch.Tensor, form: str) -> float:
    n = psi.shape[0]
    total = 0.0
    for g in range(pairs.shape[0]):
        ds = []
        for i, j in pairs[g].tolist():
            if form == "paper":
                ds.append(naive_d(psi[:, i].flatten().tolist(), psi[:, j].flatten().tolist()))
            else:
                ds.append(sum(naive_d(psi[k, i].flatten().tolist(), psi[k, j].flatten().tolist())
                              for k in range(n)) / n)
        total += sum(ds) / len(ds)
    return total


def naive_spatial(psi: torch.Tensor, scale: float = 1.0) -> float:
    n, c, h, w = psi.shape
    losses = []
    for i, ch in itertools.product(range(n), range(c)):
        cells = [(y / scale, x / scale, float(psi[i, ch, y, x])) for y in range(h) for x in range(w)]
        mass = sum(v for _, _, v in cells)
        cy = sum(y * v for y, _, v in cells) / mass
        cx = sum(x * v for _, x, v in cells) / mass
        losses.append(sum(v * math.hypot(y - cy, x - cx) for y, x, v in cells) / mass)
    return sum(losses) / len(losses)


def naive_group_norms(weight: torch.Tensor, spec: GroupSpec) -> list[float]:
    norms = []
    for g in range(spec.groups):
        sq = 0.0
        for filt in range(g * spec.size, (g + 1) * spec.size):
            sq += sum(float(v) ** 2 for v in weight[filt].flatten())
        norms.append(math.sqrt(sq))
    return norms


# ---------------------------------------------------------------- psi

def test_psi_matches_naive_and_std_is_not_detached():
    pre = _randn(2, 3, 2, 3, seed=1).requires_grad_()
    psi = soft_receptive_field(pre, 1.5, -0.25, eps=1e-5)
    pre_ref = pre.detach().clone().requires_grad_()
    ref = naive_psi(pre_ref, 1.5, -0.25, 1e-5)
    torch.testing.assert_close(psi, ref)
    # gradients agree with the naive version, whose std is part of the graph
    weights = _rand(2, 3, 2, 3, seed=2)
    (psi * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(pre.grad, pre_ref.grad)


def test_psi_bn_divides_by_gamma():
    bn_out = _randn(2, 3, 2, 2, seed=3)
    gamma = torch.tensor([0.5, -2.0, 1.0], dtype=D64)
    psi = soft_receptive_field_bn(bn_out, gamma, 1.0, 0.0)
    torch.testing.assert_close(psi, torch.sigmoid(bn_out / gamma.view(1, 3, 1, 1)))
    # doubling gamma halves tau: sigmoid(tau / 2)
    psi2 = soft_receptive_field_bn(bn_out, 2 * gamma, 1.0, 0.0)
    tau = torch.logit(psi)
    torch.testing.assert_close(torch.logit(psi2), tau / 2)
    # a zero gamma stays finite (sign-preserving eps)
    zero = soft_receptive_field_bn(bn_out, torch.zeros(3, dtype=D64), 1.0, 0.0)
    assert torch.isfinite(zero).all()


def test_psi_bn_equals_paper_tau():
    # tau = a_hat + beta / gamma with a_hat the batch-normalised pre-activation (paper, eq. 4)
    a = _randn(4, 2, 3, 3, seed=4)
    bn = nn.BatchNorm2d(2).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.7, -1.3]))
        bn.bias.copy_(torch.tensor([0.2, 0.9]))
    out = bn(a)
    mean = a.mean(dim=(0, 2, 3), keepdim=True)
    var = a.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    a_hat = (a - mean) / torch.sqrt(var + bn.eps)
    tau = a_hat + (bn.bias / bn.weight).view(1, 2, 1, 1)
    psi = soft_receptive_field_bn(out, bn.weight, 2.0, 0.5)
    torch.testing.assert_close(psi, torch.sigmoid(2.0 * tau + 0.5))


def test_receptive_field_scale_fixed_or_learnable():
    fixed = ReceptiveFieldScale()
    assert list(fixed.parameters()) == []
    assert (float(fixed.p1), float(fixed.p2)) == (1.0, 0.0)
    learn = ReceptiveFieldScale(learnable=True)
    assert len(list(learn.parameters())) == 2
    pre = _randn(2, 2, 3, 3, seed=5).float()
    learn(Captured(pre=pre, gamma=None)).sum().backward()
    assert learn.p1.grad is not None and learn.p2.grad is not None
    # with a gamma, the scale uses the BN variant
    gamma = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(fixed(Captured(pre=pre, gamma=gamma)), torch.sigmoid(pre / gamma.view(1, 2, 1, 1)))


# ---------------------------------------------------------------- D and L_g

def test_distance_of_indicators_is_one_minus_iou():
    a = torch.zeros(4, 4)
    b = torch.zeros(4, 4)
    a[0:2, 0:2] = 1  # 4 pixels
    b[1:3, 0:2] = 1  # 4 pixels, 2 shared: IoU = 2 / 6
    d = soft_iou_distance(a, b, dims=(0, 1))
    assert d.item() == pytest.approx(1 - 2 / 6)
    assert soft_iou_distance(a, a).item() == 0.0
    disjoint = torch.zeros(4, 4)
    disjoint[3, 3] = 1
    assert soft_iou_distance(a, disjoint).item() == pytest.approx(1.0)
    p = _rand(3, 5, seed=6)
    assert soft_iou_distance(p, p, dims=1).tolist() == [0.0, 0.0, 0.0]


def test_distance_of_zero_maps_is_zero_with_finite_grad():
    p = torch.zeros(2, 3, requires_grad=True)
    q = torch.zeros(2, 3, requires_grad=True)
    d = soft_iou_distance(p, q, dims=1)
    assert d.tolist() == [0.0, 0.0]
    d.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


def test_sample_pairs_within_groups_distinct_fresh_reproducible():
    spec = GroupSpec(channels=11, groups=3)  # f = 3, 2 free filters
    gen = torch.Generator().manual_seed(7)
    pairs = sample_pairs(spec, gen, pairs_per_filter=3)
    assert pairs.shape == (3, 9, 2) and pairs.dtype == torch.int64
    for g in range(3):
        for i, j in pairs[g].tolist():
            assert i != j
            assert g * 3 <= i < (g + 1) * 3 and g * 3 <= j < (g + 1) * 3
    again = sample_pairs(spec, gen, pairs_per_filter=3)
    assert not torch.equal(pairs, again)  # fresh each call
    replay = torch.Generator().manual_seed(7)
    assert torch.equal(sample_pairs(spec, replay), pairs)
    assert torch.equal(sample_pairs(spec, replay), again)
    # every ordered pair of a group can be drawn
    many = sample_pairs(spec, torch.Generator().manual_seed(8), pairs_per_filter=100)
    assert {tuple(p) for p in many[1].tolist()} == {(i, j) for i in range(3, 6) for j in range(3, 6) if i != j}
    assert sample_pairs(GroupSpec(4, 4), gen).shape == (4, 0, 2)  # groups of one: no pairs


@pytest.mark.parametrize("form", ["paper", "per_image"])
def test_group_loss_matches_naive(form):
    spec = GroupSpec(channels=7, groups=2)  # f = 3, one free filter
    psi = _rand(3, 7, 2, 3, seed=9)
    pairs = sample_pairs(spec, torch.Generator().manual_seed(10))
    got = group_activation_loss(psi, spec, pairs, form=form)
    assert got.item() == pytest.approx(naive_group_loss(psi, pairs, form), rel=1e-12)


def test_group_forms_differ_and_identical_groups_give_zero():
    spec = GroupSpec(channels=4, groups=2)
    psi = _rand(3, 4, 2, 2, seed=11)
    pairs = sample_pairs(spec, torch.Generator().manual_seed(12))
    assert group_activation_loss(psi, spec, pairs, "paper").item() != pytest.approx(
        group_activation_loss(psi, spec, pairs, "per_image").item())
    same = psi.clone()
    same[:, 1] = same[:, 0]
    same[:, 3] = same[:, 2]
    assert group_activation_loss(same, spec, pairs).item() == 0.0


# ---------------------------------------------------------------- L_s

def test_spatial_loss_hand_values():
    one = torch.zeros(1, 1, 5, 6)
    one[0, 0, 2, 3] = 1
    assert spatial_loss(one).item() == 0.0
    two = torch.zeros(1, 1, 5, 6)
    two[0, 0, 0, 0] = 1
    two[0, 0, 3, 4] = 1  # distance 5: centre halfway, each pixel 2.5 away
    assert spatial_loss(two).item() == pytest.approx(2.5)
    assert spatial_loss(two, coords="normalized").item() == pytest.approx(2.5 / 6)
    # the mean over maps and images: a second map with loss 0 halves it
    both = torch.cat([two, one], dim=1)
    assert spatial_loss(both).item() == pytest.approx(1.25)


@pytest.mark.parametrize("coords,scale", [("pixel", 1.0), ("normalized", 4.0)])
def test_spatial_loss_matches_naive(coords, scale):
    psi = _rand(2, 3, 3, 4, seed=13)
    assert spatial_loss(psi, coords=coords).item() == pytest.approx(naive_spatial(psi, scale), rel=1e-12)


# ---------------------------------------------------------------- R_bn, relevance, proximal step

def test_block_norm_of_ones():
    spec = GroupSpec(channels=7, groups=3)  # f = 2, one free filter
    weight = torch.ones(7, 4, 3, 3)
    weight[6] = 100.0  # the free filter is excluded
    per_group = math.sqrt(2 * 4 * 3 * 3)
    torch.testing.assert_close(group_norms(weight, spec), torch.full((3,), per_group))
    assert block_norm(weight, spec).item() == pytest.approx(3 * per_group)
    assert group_norms(weight, spec).sum().item() == pytest.approx(3 * per_group)  # beta_l = R_bn


def test_relevance_matches_naive():
    spec = GroupSpec(channels=8, groups=3, free=2)
    weight = _randn(8, 2, 3, 3, seed=14)
    assert group_norms(weight, spec).tolist() == pytest.approx(naive_group_norms(weight, spec), rel=1e-12)


def test_relevance_bn():
    spec = GroupSpec(channels=4, groups=2)
    weight = torch.ones(4, 1, 1, 1)
    bn = nn.BatchNorm2d(4, eps=0.0)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 1.0, 9.0]))
    # effective filters: 1/2, 2, 0, 1 -> group norms sqrt(1/4 + 4), sqrt(0 + 1)
    got = group_norms_bn(weight, spec, bn)
    assert got.tolist() == pytest.approx([math.sqrt(4.25), 1.0])
    # the plain relevance ignores the BN
    assert group_norms(weight, spec).tolist() == pytest.approx([math.sqrt(2), math.sqrt(2)])


def test_proximal_step_zeroes_weak_groups_and_shrinks_others():
    spec = GroupSpec(channels=5, groups=2)  # f = 2, one free filter
    weight = torch.zeros(5, 1, 2, 2)
    weight[0:2] = 0.1  # group norm sqrt(8 * 0.01) ~ 0.28 < 1
    weight[2:4] = 1.0  # group norm sqrt(8) ~ 2.83
    weight[4] = 0.01  # free filter: untouched
    before = weight.clone()
    proximal_group_step(weight, spec, threshold=1.0)
    assert (weight[0:2] == 0).all()
    torch.testing.assert_close(weight[2:4], before[2:4] * (1 - 1 / math.sqrt(8)))
    torch.testing.assert_close(weight[4], before[4])
    proximal_group_step(weight, spec, threshold=0.5)  # a zero group stays zero, finite
    assert (weight[0:2] == 0).all() and torch.isfinite(weight).all()
    with pytest.raises(InputError, match="threshold"):
        proximal_group_step(weight, spec, threshold=-1.0)


# ---------------------------------------------------------------- numerical safety

@pytest.mark.parametrize("shape,groups", [((3, 4, 5, 5), 2), ((1, 4, 1, 1), 2), ((2, 3, 4, 4), 3)])
def test_safe_for_zero_maps_single_image_single_filter_groups(shape, groups):
    pre = torch.zeros(shape, requires_grad=True)
    spec = GroupSpec(channels=shape[1], groups=groups)
    weight = torch.zeros(shape[1], 2, 3, 3, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    for psi in (soft_receptive_field(pre, 1.0, 0.0),
                soft_receptive_field_bn(pre, torch.zeros(shape[1]), 1.0, 0.0)):
        terms = [group_activation_loss(psi, spec, sample_pairs(spec, gen), form)
                 for form in ("paper", "per_image")]
        terms += [spatial_loss(psi), spatial_loss(psi, "normalized"), spatial_loss(torch.zeros_like(psi) * psi)]
        terms += [block_norm(weight, spec)]
        total = torch.stack(terms).sum()
        assert all(torch.isfinite(t) for t in terms)
        total.backward()
        assert torch.isfinite(pre.grad).all() and torch.isfinite(weight.grad).all()
    # all-zero pre-activations: psi = 1/2 everywhere, so L_g is exactly 0
    psi = soft_receptive_field(pre, 1.0, 0.0)
    assert group_activation_loss(psi, spec, sample_pairs(spec, gen)).item() == 0.0


def test_single_filter_groups_give_zero_loss():
    spec = GroupSpec(channels=3, groups=3)
    psi = _rand(2, 3, 2, 2, seed=15).requires_grad_()
    loss = group_activation_loss(psi, spec, sample_pairs(spec, torch.Generator().manual_seed(0)))
    assert loss.item() == 0.0
    loss.backward()
    assert (psi.grad == 0).all()


# ---------------------------------------------------------------- the combined objective

class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3))


def _setup():
    torch.manual_seed(0)
    model = TwoConv()
    layers = [LayerGroups("conv1", GroupSpec(6, 2)), LayerGroups("conv2", GroupSpec(4, 2))]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(16))
    return model, layers, x


def test_cgl_terms_combine_the_layers():
    model, layers, x = _setup()
    options = CGLOptions(spatial_layers="conv2", spatial_coords="normalized", group_form="per_image",
                         layer_reduction="sum")
    with GroupActivations(model, layers) as acts:
        model(x)
        captured = acts.captured
    scale = ReceptiveFieldScale()
    terms = cgl_terms(captured, layers, scale, torch.Generator().manual_seed(3), options, model)
    # by hand, replaying the same generator in the same layer order
    gen = torch.Generator().manual_seed(3)
    psi1 = soft_receptive_field(model.conv1(x), 1.0, 0.0)
    psi2 = soft_receptive_field(model.conv2(torch.relu(model.conv1(x))), 1.0, 0.0)
    l_g = (group_activation_loss(psi1, layers[0].spec, sample_pairs(layers[0].spec, gen), "per_image")
           + group_activation_loss(psi2, layers[1].spec, sample_pairs(layers[1].spec, gen), "per_image"))
    torch.testing.assert_close(terms["l_g"], l_g)
    torch.testing.assert_close(terms["l_s"], spatial_loss(psi2, "normalized"))
    r_bn = block_norm(model.conv1.weight, layers[0].spec) + block_norm(model.conv2.weight, layers[1].spec)
    torch.testing.assert_close(terms["r_bn"], r_bn)


def test_l_g_and_l_s_average_the_layers_they_act_on_by_default():
    """The authors' form: L_g and L_s are means over their layers (R_bn stays a sum, eq. 6)."""
    model, layers, x = _setup()
    assert CGLOptions().layer_reduction == "mean"
    with GroupActivations(model, layers) as acts:
        model(x)
        captured = acts.captured
    terms = cgl_terms(captured, layers, ReceptiveFieldScale(), torch.Generator().manual_seed(5), CGLOptions(), model)
    gen = torch.Generator().manual_seed(5)
    psi1 = soft_receptive_field(model.conv1(x), 1.0, 0.0)
    psi2 = soft_receptive_field(model.conv2(torch.relu(model.conv1(x))), 1.0, 0.0)
    g1 = group_activation_loss(psi1, layers[0].spec, sample_pairs(layers[0].spec, gen), "paper")
    g2 = group_activation_loss(psi2, layers[1].spec, sample_pairs(layers[1].spec, gen), "paper")
    torch.testing.assert_close(terms["l_g"], (g1 + g2) / 2)
    torch.testing.assert_close(terms["l_s"], (spatial_loss(psi1) + spatial_loss(psi2)) / 2)
    r_bn = block_norm(model.conv1.weight, layers[0].spec) + block_norm(model.conv2.weight, layers[1].spec)
    torch.testing.assert_close(terms["r_bn"], r_bn)
    # sum is the other choice: twice the mean for two layers
    summed = cgl_terms(captured, layers, ReceptiveFieldScale(), torch.Generator().manual_seed(5),
                       CGLOptions(layer_reduction="sum"), model)
    torch.testing.assert_close(summed["l_g"], g1 + g2)


def test_objective_total_resume_and_descent():
    model, layers, x = _setup()
    options = CGLOptions(lambda_bn=0.1, lambda_g=2.0, lambda_s=0.5)
    objective = CGLObjective(model, layers, options, seed=4)
    state = objective.state_dict()
    with GroupActivations(model, layers) as acts:
        model(x)
        first = objective(acts.captured)
        expected = 0.1 * first["r_bn"] + 2.0 * first["l_g"] + 0.5 * first["l_s"]
        torch.testing.assert_close(first["total"], expected)
        # restoring the state replays the same pairs: the same L_g
        objective.load_state_dict(state)
        torch.testing.assert_close(objective(acts.captured)["l_g"], first["l_g"])
        # a few plain gradient steps on the objective lower it
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        values = []
        for _ in range(5):
            objective.load_state_dict(state)  # same pairs each step, so values compare
            acts.clear()
            model(x)
            total = objective(acts.captured)["total"]
            values.append(total.item())
            opt.zero_grad()
            total.backward()
            opt.step()
    assert values[-1] < values[0]


def test_objective_skips_zero_lambdas_unless_monitoring():
    model, layers, x = _setup()
    with GroupActivations(model, layers) as acts:
        model(x)
        out = CGLObjective(model, layers, CGLOptions(lambda_bn=1.0), seed=0, monitor=False)(acts.captured)
        assert set(out) == {"r_bn", "total"}
        torch.testing.assert_close(out["total"], out["r_bn"])
        # monitoring is the default, here as in the training config users get from the CLI
        default = CGLObjective(model, layers, CGLOptions(lambda_bn=1.0), seed=0)
        assert default.monitor is TrainConfig().monitor is True
        monitored = default(acts.captured)
        assert set(monitored) == {"r_bn", "l_g", "l_s", "total"}
        assert not monitored["l_g"].requires_grad and monitored["l_g"].item() > 0
    prox = CGLObjective(model, layers, CGLOptions(lambda_bn=1.0, block_norm_mode="proximal"), seed=0,
                        monitor=False)
    assert prox({})["total"].item() == 0.0
    prox.proximal_step(lr=100.0)  # threshold 100: every group goes to zero
    assert (model.conv1.weight == 0).all() and (model.conv2.weight == 0).all()


def test_options_validation_and_round_trip():
    options = CGLOptions(lambda_g=1e-3, group_form="per_image")
    assert CGLOptions.from_dict(options.to_dict()) == options
    with pytest.raises(InputError, match="group_form"):
        CGLOptions(group_form="pairs")
    with pytest.raises(InputError, match="lambda_s"):
        CGLOptions(lambda_s=-1.0)
    with pytest.raises(InputError, match="spatial_layers.*conv9"):
        CGLOptions(spatial_layers="conv9").spatial_layer_names([LayerGroups("conv1", GroupSpec(6, 2))])
    with pytest.raises(InputError, match="unknown"):
        CGLOptions.from_dict({"lambda_x": 1.0})


# ---------------------------------------------------------------- gradients of the fused implementations

def naive_group_loss_torch(psi: torch.Tensor, pairs: torch.Tensor, form: str) -> torch.Tensor:
    """Differentiable loop version of L_g (autograd through plain per-pair tensor ops)."""
    total = psi.new_zeros(())
    for g in range(pairs.shape[0]):
        ds = []
        for i, j in pairs[g].tolist():
            images = [psi[:, i]] if form == "paper" else [psi[k, i] for k in range(psi.shape[0])]
            others = [psi[:, j]] if form == "paper" else [psi[k, j] for k in range(psi.shape[0])]
            per = [2 * (p - q).abs().sum() / (p.abs().sum() + q.abs().sum() + (p - q).abs().sum())
                   for p, q in zip(images, others)]
            ds.append(sum(per) / len(per))
        total = total + sum(ds) / len(ds)
    return total


def naive_spatial_torch(psi: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Differentiable loop version of L_s, pixel by pixel."""
    n, c, h, w = psi.shape
    losses = []
    for i, ch in itertools.product(range(n), range(c)):
        m = psi[i, ch]
        mass = m.sum()
        cy = sum(m[y, x] * (y / scale) for y in range(h) for x in range(w)) / mass
        cx = sum(m[y, x] * (x / scale) for y in range(h) for x in range(w)) / mass
        spread = sum(m[y, x] * torch.sqrt((y / scale - cy) ** 2 + (x / scale - cx) ** 2)
                     for y in range(h) for x in range(w))
        losses.append(spread / mass)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("form", ["paper", "per_image"])
def test_group_loss_gradient_matches_naive_autograd(form):
    spec = GroupSpec(channels=7, groups=2)  # f = 3, one free filter (its gradient must be 0)
    psi = _rand(3, 7, 2, 3, seed=21).requires_grad_()
    pairs = sample_pairs(spec, torch.Generator().manual_seed(22))
    group_activation_loss(psi, spec, pairs, form).backward()
    ref = psi.detach().clone().requires_grad_()
    naive_group_loss_torch(ref, pairs, form).backward()
    torch.testing.assert_close(psi.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert (psi.grad[:, 6] == 0).all() and psi.grad.abs().sum() > 0
    x = _rand(2, 4, 2, 2, seed=23).requires_grad_()
    spec4 = GroupSpec(4, 2)
    pairs4 = sample_pairs(spec4, torch.Generator().manual_seed(24))
    assert torch.autograd.gradcheck(lambda p: group_activation_loss(p, spec4, pairs4, form), (x,))


@pytest.mark.parametrize("form", ["paper", "per_image"])
def test_group_loss_chunking_changes_nothing(form, monkeypatch):
    import cgl_train.losses as losses
    spec = GroupSpec(channels=9, groups=3)
    psi = _rand(2, 9, 3, 3, seed=25)
    pairs = sample_pairs(spec, torch.Generator().manual_seed(26))
    results = []
    monkeypatch.setattr(losses, "_THREADED_CHUNK_SCALE", 1)  # the same blocks whatever the thread count
    for budget in (1 << 30, 1):  # one chunk; then one pair per chunk
        monkeypatch.setitem(losses._PAIR_CHUNK_ELEMS, "cpu", budget)
        x = psi.clone().requires_grad_()
        value = group_activation_loss(x, spec, pairs, form)
        value.backward()
        results.append((value.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)
    assert results[0][0].item() == pytest.approx(naive_group_loss(psi, pairs, form), rel=1e-12)


@pytest.mark.parametrize("coords,scale", [("pixel", 1.0), ("normalized", 4.0)])
def test_spatial_loss_gradient_matches_naive_autograd(coords, scale):
    psi = _rand(2, 2, 3, 4, seed=27).requires_grad_()
    spatial_loss(psi, coords=coords).backward()
    ref = psi.detach().clone().requires_grad_()
    naive_spatial_torch(ref, scale).backward()
    torch.testing.assert_close(psi.grad, ref.grad, rtol=1e-10, atol=1e-12)
    x = _rand(1, 2, 3, 3, seed=28).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: spatial_loss(p, coords=coords), (x,))


def test_spatial_loss_gradient_hand_values():
    # one hot pixel at (1, 2): c sits on it, spread 0; dL/dpsi_j = |j - (1, 2)| / (maps), the
    # direction term counting 0 at d = 0 (zero-safe sqrt); an all-zero map has gradient 0
    psi = torch.zeros(1, 2, 3, 4, dtype=D64)
    psi[0, 0, 1, 2] = 1.0
    psi.requires_grad_()
    loss = spatial_loss(psi)
    assert loss.item() == 0.0
    loss.backward()
    ys, xs = torch.meshgrid(torch.arange(3, dtype=D64), torch.arange(4, dtype=D64), indexing="ij")
    torch.testing.assert_close(psi.grad[0, 0], torch.sqrt((ys - 1) ** 2 + (xs - 2) ** 2) / 2)
    assert (psi.grad[0, 1] == 0).all()


def test_psi_bn_gradient_matches_formula():
    bn_out = _randn(2, 3, 2, 2, seed=29).requires_grad_()
    gamma = torch.tensor([0.5, -2.0, 1.5], dtype=D64, requires_grad=True)
    weights = _rand(2, 3, 2, 2, seed=30)
    (soft_receptive_field_bn(bn_out, gamma, 1.5, -0.5) * weights).sum().backward()
    b2, g2 = bn_out.detach().clone().requires_grad_(), gamma.detach().clone().requires_grad_()
    (torch.sigmoid(1.5 * (b2 / g2.view(1, 3, 1, 1)) - 0.5) * weights).sum().backward()
    torch.testing.assert_close(bn_out.grad, b2.grad)
    torch.testing.assert_close(gamma.grad, g2.grad)


# ---------------------------------------------------------------- the blocked (cache-sized) implementations

def test_psi_gradients_in_every_input_match_autograd_of_the_formula():
    pre = _randn(3, 4, 2, 3, seed=31).requires_grad_()
    p1 = torch.tensor(1.3, dtype=D64, requires_grad=True)
    p2 = torch.tensor(-0.4, dtype=D64, requires_grad=True)
    weights = _rand(3, 4, 2, 3, seed=32)
    (soft_receptive_field(pre, p1, p2, eps=1e-3) * weights).sum().backward()
    refs = [t.detach().clone().requires_grad_() for t in (pre, p1, p2)]
    std = refs[0].var(dim=(0, 2, 3), unbiased=False, keepdim=True).sqrt() + 1e-3
    (torch.sigmoid(refs[1] * refs[0] / std + refs[2]) * weights).sum().backward()
    for got, ref in zip((pre, p1, p2), refs):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-12)
    gamma = torch.tensor([0.5, -2.0, 1.5, 0.7], dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: soft_receptive_field(x, a, b), (pre, p1, p2))
    assert torch.autograd.gradcheck(lambda x, g, a, b: soft_receptive_field_bn(x, g, a, b), (pre, gamma, p1, p2))
    # a constant channel (S = 0): finite values and gradients, psi = sigmoid(p1 x / eps + p2)
    flat = pre.detach().clone()
    flat[:, 1] = 0.25
    flat.requires_grad_()
    psi = soft_receptive_field(flat, 1.0, 0.0, eps=1e-3)
    torch.testing.assert_close(psi[:, 1], torch.sigmoid(torch.full_like(psi[:, 1], 250.0)))
    psi.sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_psi_std_keeps_its_precision_under_a_large_mean():
    # float32 maps with mean 1e4 and std 1: a sum-of-squares formula would lose every digit
    pre = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(33)) + 1e4).float()
    psi = soft_receptive_field(pre, 1.0, -1e4, eps=0.0)
    ref = torch.sigmoid(pre.double() / pre.double().std(dim=(0, 2, 3), unbiased=False, keepdim=True) - 1e4)
    torch.testing.assert_close(psi.double(), ref, rtol=0, atol=2e-3)
    assert psi.std() > 0.1  # the maps are not saturated: the comparison says something


@pytest.mark.parametrize("what", ["psi", "psi_bn", "spatial"])
def test_blocking_changes_nothing(what, monkeypatch):
    import cgl_train.losses as losses
    pre = _randn(3, 5, 4, 3, seed=34)
    gamma = torch.tensor([0.5, -2.0, 1.5, 0.7, 1.1], dtype=D64)
    weights = _rand(3, 5, 4, 3, seed=35)
    fn = {"psi": lambda x: soft_receptive_field(x, 1.2, 0.3) * weights,
          "psi_bn": lambda x: soft_receptive_field_bn(x, gamma, 1.2, 0.3) * weights,
          "spatial": lambda x: spatial_loss(torch.sigmoid(x), "normalized")}[what]
    results = []
    monkeypatch.setattr(losses, "_THREADED_CHUNK_SCALE", 1)  # the same blocks whatever the thread count
    for budget in (1 << 30, 1, 30):  # one block; one map per block; two maps per block, the last alone
        monkeypatch.setitem(losses._CHUNK_ELEMS, "cpu", budget)
        x = pre.clone().requires_grad_()
        value = fn(x).sum()
        value.backward()
        results.append((value.detach(), x.grad))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("form", ["paper", "per_image"])
def test_group_loss_with_pairs_outside_their_groups_matches_naive(form):
    # the backward then works image by image instead of (image, group) block by block
    spec = GroupSpec(channels=7, groups=2)
    psi = _rand(3, 7, 2, 3, seed=36).requires_grad_()
    pairs = torch.tensor([[[0, 4], [5, 1], [2, 2]], [[3, 0], [2, 1], [4, 5]]])  # (2, 3, 2): across groups, i == j
    group_activation_loss(psi, spec, pairs, form).backward()
    ref = psi.detach().clone().requires_grad_()
    naive = naive_group_loss_torch(ref, pairs, form)
    naive.backward()
    assert group_activation_loss(psi.detach(), spec, pairs, form).item() == pytest.approx(naive.item(), rel=1e-12)
    torch.testing.assert_close(psi.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_spatial_loss_of_saturated_float32_maps_has_finite_gradients():
    # psi ~ 1 on one pixel and ~1e-30 elsewhere: the centroid sits on the pixel, offsets underflow
    logits = torch.full((2, 3, 6, 5), -69.0)
    logits[:, :, 0, 2] = 20.0
    psi = torch.sigmoid(logits).requires_grad_()
    loss = spatial_loss(psi)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(psi.grad).all()
    # as for a one-hot map: dL/dpsi_j = |j - c| / (number of maps), c = (0, 2), the pixel's own term 0
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij")
    expected = torch.sqrt(ys ** 2 + (xs - 2) ** 2) / 6
    torch.testing.assert_close(psi.grad, expected.expand_as(psi.grad), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [
    dict(),  # the defaults: paper L_g form, normalized L_s, mean over layers
    dict(group_form="per_image", spatial_coords="pixel", layer_reduction="sum"),
    dict(spatial_layers="conv2", group_layers="conv1"),
])
def test_cuda_equals_cpu_terms_and_gradients(options, monkeypatch):
    """Every CGL term and every parameter gradient of the total agree between CPU and CUDA (float32, no TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    out = {}
    for dev in ("cpu", "cuda"):
        model, layers, x = _setup()
        model = model.to(dev)
        objective = CGLObjective(model, layers, CGLOptions(lambda_bn=0.1, lambda_g=2.0, lambda_s=0.5, **options),
                                 seed=4)
        with GroupActivations(model, layers) as acts:
            logits = model(x.to(dev))
            terms = objective(acts.captured)
            (terms["total"] + logits.square().mean()).backward()
        out[dev] = ({k: v.detach().cpu() for k, v in terms.items() if torch.is_tensor(v)},
                    {n: p.grad.detach().cpu() for n, p in model.named_parameters()})
    torch.set_float32_matmul_precision(precision)
    (t_cpu, g_cpu), (t_cuda, g_cuda) = out["cpu"], out["cuda"]
    assert set(t_cpu) == set(t_cuda) and {"total", "r_bn", "l_g", "l_s"} <= set(t_cpu)
    for k in t_cpu:
        torch.testing.assert_close(t_cuda[k], t_cpu[k], rtol=1e-5, atol=1e-6, msg=k)
    for n in g_cpu:
        torch.testing.assert_close(g_cuda[n], g_cpu[n], rtol=1e-4, atol=1e-6, msg=n)
