"""Concept Group Learning losses (paper section 3; choices in design/cgl.md).

Every function is vectorised over groups, pairs and maps, and numerically safe:
no NaN/inf in values or gradients for all-zero maps, a single image, or a group
of one filter. Reductions run in float32 at least, so AMP half-precision maps
do not overflow.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from broden.errors import InputError
from cgl_train.config import BLOCK_NORM_MODES, GROUP_FORMS, SPATIAL_COORDS, CGLOptions
from cgl_train.groups import Captured, GroupSpec, LayerGroups
from dissect.groups import group_norms, group_norms_bn

__all__ = ["soft_receptive_field", "soft_receptive_field_bn", "ReceptiveFieldScale",
           "soft_iou_distance", "sample_pairs", "group_activation_loss", "spatial_loss",
           "block_norm", "proximal_group_step", "CGLOptions", "cgl_terms", "CGLObjective",
           "GROUP_FORMS", "SPATIAL_COORDS", "BLOCK_NORM_MODES", "TERMS"]



def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where den == 0 (gradients stay finite: no 0/0 in backward)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


# ---------------------------------------------------------------- soft receptive field

def _sigmoid_affine(x: torch.Tensor, scale: torch.Tensor | float, shift: torch.Tensor | float) -> torch.Tensor:
    """sigmoid(x * scale + shift) in two passes over x (addcmul, then sigmoid) instead of four.

    scale is per channel (1, C, 1, 1) (or a scalar); x (N, C, H, W).
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    shift = torch.as_tensor(shift, dtype=x.dtype, device=x.device)
    # addcmul's backward needs only its inputs, so the in-place sigmoid is safe for autograd
    return torch.addcmul(shift, x, scale).sigmoid_()


def soft_receptive_field(pre: torch.Tensor, p1: torch.Tensor | float, p2: torch.Tensor | float,
                         eps: float = 1e-5) -> torch.Tensor:
    """psi = sigmoid(p1 * pre / S + p2), S = per-channel std over N*H*W, plus eps (eq. 1).

    S is the population std (divisor N*H*W, finite for one value) and is NOT
    detached: gradients flow through it, as in the authors' code (srb-cv/cgl).
    pre: (N, C, H, W) -> psi (N, C, H, W).
    """
    if pre.dim() != 4:
        raise InputError(f"soft_receptive_field: expected a (N, C, H, W) map, got shape {tuple(pre.shape)}")
    pre = _upcast(pre)
    var = pre.var(dim=(0, 2, 3), unbiased=False, keepdim=True)  # (1, C, 1, 1)
    std = _safe_sqrt(var) + eps
    return _sigmoid_affine(pre, p1 / std, p2)


def soft_receptive_field_bn(bn_out: torch.Tensor, gamma: torch.Tensor, p1: torch.Tensor | float,
                            p2: torch.Tensor | float, eps: float = 1e-5) -> torch.Tensor:
    """psi = sigmoid(p1 * tau + p2), tau = bn_out / gamma = a_hat + beta / gamma (eq. 4).

    Divides by the BN's gamma (not its running variance, the authors' bug); a
    gamma with |gamma| < eps is replaced by eps with gamma's sign (+eps at 0).
    bn_out: (N, C, H, W), gamma: (C,) -> psi (N, C, H, W).
    """
    if bn_out.dim() != 4 or gamma.dim() != 1 or gamma.shape[0] != bn_out.shape[1]:
        raise InputError(f"soft_receptive_field_bn: expected bn_out (N, C, H, W) and gamma (C,), got "
                         f"{tuple(bn_out.shape)} and {tuple(gamma.shape)}")
    bn_out = _upcast(bn_out)
    gamma = _upcast(gamma)
    sign = torch.where(gamma < 0, -torch.ones_like(gamma), torch.ones_like(gamma))
    safe_gamma = torch.where(gamma.abs() < eps, sign * eps, gamma)
    return _sigmoid_affine(bn_out, p1 / safe_gamma.view(1, -1, 1, 1), p2)


class ReceptiveFieldScale(nn.Module):
    """The (P1, P2) pair shared by every layer: fixed buffers (1, 0) by default, Parameters if learnable.

    Beware: learned under L_g alone, P1 -> 0 makes every psi equal and L_g zero.
    """

    def __init__(self, p1: float = 1.0, p2: float = 0.0, learnable: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.learnable = learnable
        self.eps = eps
        if learnable:
            self.p1 = nn.Parameter(torch.tensor(float(p1)))
            self.p2 = nn.Parameter(torch.tensor(float(p2)))
        else:
            self.register_buffer("p1", torch.tensor(float(p1)))
            self.register_buffer("p2", torch.tensor(float(p2)))

    def forward(self, captured: Captured) -> torch.Tensor:
        """psi of a capture: the BN variant when it carries a gamma, else the std variant."""
        if captured.gamma is not None:
            return soft_receptive_field_bn(captured.pre, captured.gamma, self.p1, self.p2, self.eps)
        return soft_receptive_field(captured.pre, self.p1, self.p2, self.eps)


# ---------------------------------------------------------------- group activation loss

def soft_iou_distance(p: torch.Tensor, q: torch.Tensor, dims: int | Sequence[int] | None = None) -> torch.Tensor:
    """D = 2|p-q|_1 / (|p|_1 + |q|_1 + |p-q|_1) over `dims` (all when None); D(0, 0) = 0 (eq. 2).

    For indicator maps D = 1 - IoU.
    """
    p, q = _upcast(p), _upcast(q)
    if dims is None:
        dims = tuple(range(p.dim()))
    diff = (p - q).abs().sum(dim=dims)
    den = p.abs().sum(dim=dims) + q.abs().sum(dim=dims) + diff
    return _safe_div(2 * diff, den)


def sample_pairs(spec: GroupSpec, generator: torch.Generator, pairs_per_filter: int = 3) -> torch.Tensor:
    """LongTensor (G, r, 2) of CHANNEL indices (i != j, both in group g), r = pairs_per_filter * f.

    Pairs are drawn uniformly with replacement among the f(f-1) ordered pairs
    (r exceeds f(f-1) for f <= 3). A group of one filter has no pairs: r = 0.
    The tensor is on the CPU (the generator's device); move it as needed.
    """
    if pairs_per_filter < 1:
        raise InputError(f"pairs_per_filter must be >= 1, got {pairs_per_filter}")
    f, groups = spec.size, spec.groups
    if f < 2:
        return torch.zeros(groups, 0, 2, dtype=torch.int64)
    r = pairs_per_filter * f
    i = torch.randint(0, f, (groups, r), generator=generator, dtype=torch.int64)
    j = torch.randint(0, f - 1, (groups, r), generator=generator, dtype=torch.int64)
    j = j + (j >= i).long()  # skip i: uniform over the f - 1 others
    offset = (torch.arange(groups, dtype=torch.int64) * f).view(groups, 1)
    return torch.stack([i + offset, j + offset], dim=-1)


# Pairs are processed in chunks of about this many map elements per gathered side: on the CPU a
# chunk then stays in cache, on a GPU one or two chunks cover a layer (few kernel launches).
_PAIR_CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 26}
_DEFAULT_CHUNK_ELEMS = 1 << 24


def _pair_chunk(device: torch.device, row_elems: int) -> int:
    """Number of pairs per chunk for rows of `row_elems` elements on `device` (at least 1)."""
    budget = _PAIR_CHUNK_ELEMS.get(device.type, _DEFAULT_CHUNK_ELEMS)
    return max(1, budget // max(1, row_elems))


class _PairL1(torch.autograd.Function):
    """L1 norms of channels and of differences of channel pairs, without storing the (P, N, S) differences.

    forward(rows (C, N, S), left (P,), right (P,), per_image) -> (diff, norms):
    diff = sum |rows[left] - rows[right]| and norms = sum |rows|, over (N, S)
    (shapes (P,), (C,)) or over S only when per_image (shapes (P, N), (C, N)).
    The backward recomputes sign(rows[left] - rows[right]) chunk by chunk and
    scatters it with index_add_ along the contiguous first dim (fast on CPU and
    GPU), so the autograd graph holds only `rows`. Chunks of pairs bound the
    temporaries (and keep them in cache on CPU). The gathers use advanced
    indexing: on CPU, index_select measured slower, worst with several threads.
    sign(0) = 0, as abs's backward.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pairs, n = left.shape[0], rows.shape[1]
        sum_dims = (2,) if per_image else (1, 2)
        norms = torch.linalg.vector_norm(rows, ord=1, dim=sum_dims)  # (C,) or (C, N)
        diff = rows.new_empty((pairs, n) if per_image else (pairs,))  # (P,) or (P, N)
        step = _pair_chunk(rows.device, rows[0].numel())
        for k in range(0, pairs, step):
            a = rows[left[k:k + step]]  # (p, N, S)
            diff[k:k + step] = torch.linalg.vector_norm(a.sub_(rows[right[k:k + step]]), ord=1, dim=sum_dims)
        ctx.save_for_backward(rows, left, right)
        ctx.per_image = per_image
        return diff, norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_diff: torch.Tensor | None,
                 grad_norms: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None]:
        rows, left, right = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        # the gradient of one reduced value broadcast over the dims it summed
        expand = (lambda g: g.unsqueeze(-1)) if ctx.per_image else (lambda g: g.view(-1, 1, 1))
        if grad_norms is not None:
            grad = rows.sign().mul_(expand(grad_norms))  # (C, N, S)
        else:
            grad = torch.zeros_like(rows)
        if grad_diff is not None:
            step = _pair_chunk(rows.device, rows[0].numel())
            for k in range(0, left.shape[0], step):
                lk, rk = left[k:k + step], right[k:k + step]
                s = rows[lk]  # (p, N, S)
                s.sub_(rows[rk]).sign_().mul_(expand(grad_diff[k:k + step]))
                grad.index_add_(0, lk, s)
                grad.index_add_(0, rk, s, alpha=-1)
        return grad, None, None, None


def _pairs_to(pairs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the (CPU-drawn) pairs to `device` without a host sync: a pinned source, non_blocking."""
    if device.type == "cuda" and pairs.device.type == "cpu":
        return pairs.pin_memory().to(device, non_blocking=True)
    return pairs.to(device)


def group_activation_loss(psi: torch.Tensor, spec: GroupSpec, pairs: torch.Tensor,
                          form: str = "paper") -> torch.Tensor:
    """L_g of one layer: sum over groups of the mean over its pairs of D(psi_i, psi_j) (eq. 5).

    form="paper": the L1 norms run over the minibatch and space together (one
    ratio per pair); form="per_image": one ratio per image, then the mean over
    images (the authors' code). psi (N, C, H, W); pairs (G, r, 2) channel indices.
    """
    if form not in GROUP_FORMS:
        raise InputError(f"group form must be one of {GROUP_FORMS}, got {form!r}")
    if psi.dim() != 4 or psi.shape[1] != spec.channels:
        raise InputError(f"group_activation_loss: psi must be (N, {spec.channels}, H, W), got {tuple(psi.shape)}")
    if pairs.dim() != 3 or pairs.shape[0] != spec.groups or pairs.shape[2] != 2:
        raise InputError(f"group_activation_loss: pairs must be ({spec.groups}, r, 2), got {tuple(pairs.shape)}")
    psi = _upcast(psi)
    groups, r = pairs.shape[0], pairs.shape[1]
    if r == 0:
        return psi.sum() * 0.0  # no pairs (groups of one filter): zero, still on the graph
    n = psi.shape[0]
    flat = _pairs_to(pairs, psi.device).reshape(-1, 2)  # (G*r, 2)
    left, right = flat[:, 0].contiguous(), flat[:, 1].contiguous()
    # channel-major rows, so that gathering a channel reads (and its gradient writes) one contiguous block
    rows = psi[:, : spec.grouped].transpose(0, 1).reshape(spec.grouped, n, -1)  # (Cg, N, H*W)
    diff, norms = _PairL1.apply(rows, left, right, form == "per_image")  # (P,)|(P, N), (Cg,)|(Cg, N)
    den = norms.index_select(0, left) + norms.index_select(0, right) + diff
    dist = _safe_div(2 * diff, den)  # (P,) or (P, N)
    if form == "per_image":
        dist = dist.mean(dim=1)  # (P,)
    return dist.view(groups, r).mean(dim=1).sum()


# ---------------------------------------------------------------- spatial loss

class _SpatialSpread(torch.autograd.Function):
    """spread (N, C) = sum_j psi_j |j - c|_2 / sum_j psi_j, c = sum_j j psi_j / sum_j psi_j, per map.

    forward(psi (N, C, H, W), rows (H,), cols (W,)). The centroid comes from
    separable row and column sums; the only full-size temporaries are the
    distance map d and psi * d. The backward is the closed form
        d spread / d psi_j = (d_j - spread + v . (j - c) / mass) / mass,
        v = sum_k psi_k (c - j_k) / d_k  (terms with d_k = 0 count 0, as sqrt's zero-safe gradient),
    whose linear part in j is again separable, so no autograd graph of
    full-size temporaries is kept. A map of zero mass has spread 0 and gradient 0.
    """

    @staticmethod
    def forward(ctx: Any, psi: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        row_mass = psi.sum(dim=3)  # (N, C, H)
        col_mass = psi.sum(dim=2)  # (N, C, W)
        mass = row_mass.sum(dim=2)  # (N, C)
        cy = _safe_div(row_mass @ rows, mass)  # (N, C)
        cx = _safe_div(col_mass @ cols, mass)  # (N, C)
        dy = rows - cy.unsqueeze(-1)  # (N, C, H)
        dx = cols - cx.unsqueeze(-1)  # (N, C, W)
        dist = torch.add((dy * dy).unsqueeze(-1), (dx * dx).unsqueeze(-2)).sqrt_()  # (N, C, H, W)
        spread = _safe_div((psi * dist).sum(dim=(2, 3)), mass)  # (N, C)
        ctx.save_for_backward(psi, dist, mass, dy, dx, spread)
        return spread

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        psi, dist, mass, dy, dx, spread = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        inv_mass = _safe_div(torch.ones_like(mass), mass)  # (N, C), 0 for an empty map
        # psi / d: where d = 0 the quotient is inf or nan; those terms count 0 (zero-safe sqrt)
        w = torch.div(psi, dist).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # (N, C, H, W)
        ay = -(w.sum(dim=3) * dy).sum(dim=2) * inv_mass  # (N, C): v_y / mass
        ax = -(w.sum(dim=2) * dx).sum(dim=2) * inv_mass  # (N, C): v_x / mass
        t = grad * inv_mass  # (N, C)
        row_term = t.unsqueeze(-1) * (ay.unsqueeze(-1) * dy - spread.unsqueeze(-1))  # (N, C, H)
        col_term = (t * ax).unsqueeze(-1) * dx  # (N, C, W)
        out = dist.mul(t[..., None, None])  # (N, C, H, W)
        out += row_term.unsqueeze(-1)
        out += col_term.unsqueeze(-2)
        return out, None, None


def spatial_loss(psi: torch.Tensor, coords: str = "pixel") -> torch.Tensor:
    """L_s: mean over images and maps of sum_j psi_j |j - c|_2 / sum_j psi_j, c = psi's centroid.

    coords="pixel": j = (row, col) in pixels; coords="normalized": both divided
    by max(H, W), which keeps distances isotropic and makes L_s independent of
    the map size. An all-zero map contributes 0. psi (N, C, H, W) -> scalar.
    """
    if coords not in SPATIAL_COORDS:
        raise InputError(f"spatial coordinates must be one of {SPATIAL_COORDS}, got {coords!r}")
    if psi.dim() != 4:
        raise InputError(f"spatial_loss: expected a (N, C, H, W) map, got shape {tuple(psi.shape)}")
    psi = _upcast(psi)
    h, w = psi.shape[2], psi.shape[3]
    scale = float(max(h, w)) if coords == "normalized" else 1.0
    rows = torch.arange(h, device=psi.device, dtype=psi.dtype) / scale  # (H,)
    cols = torch.arange(w, device=psi.device, dtype=psi.dtype) / scale  # (W,)
    return _SpatialSpread.apply(psi, rows, cols).mean()


# ---------------------------------------------------------------- block norm and relevance

def block_norm(weight: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """R_bn of one layer: sum over groups of |w_g|_F (eq. 6; beta_l of eq. 7); free filters excluded."""
    return group_norms(weight, spec).sum()


@torch.no_grad()
def proximal_group_step(weight: torch.Tensor, spec: GroupSpec, threshold: float) -> None:
    """In place: w_g <- w_g * max(0, 1 - threshold / |w_g|_F) for every group (group soft-threshold).

    The proximal operator of threshold * R_bn: groups with |w_g|_F <= threshold
    become exactly zero. Use threshold = lr * lambda_bn after each optimizer step.
    """
    if threshold < 0:
        raise InputError(f"proximal threshold must be >= 0, got {threshold}")
    norms = group_norms(weight, spec)  # (G,)
    factor = torch.clamp(1 - _safe_div(torch.full_like(norms, float(threshold)), norms), min=0.0)
    factor = torch.where(norms > 0, factor, torch.zeros_like(factor))
    per_channel = factor.to(weight.dtype).repeat_interleave(spec.size)  # (G*f,)
    weight[: spec.grouped].mul_(per_channel.view(-1, *([1] * (weight.dim() - 1))))


# ---------------------------------------------------------------- the combined objective

TERMS = ("r_bn", "l_g", "l_s")


def _capture_of(captured: Mapping[str, Captured], name: str) -> Captured:
    if name not in captured:
        raise InputError(f"no activation captured for grouped layer {name!r} (captured: {sorted(captured)}); "
                         f"run the forward pass inside GroupActivations")
    return captured[name]


def cgl_terms(captured: Mapping[str, Captured], layer_groups: Sequence[LayerGroups], scale: ReceptiveFieldScale,
              generator: torch.Generator, options: CGLOptions, model: nn.Module | None = None,
              terms: Sequence[str] = TERMS) -> dict[str, torch.Tensor]:
    """The unweighted CGL terms over the grouped layers: {"r_bn", "l_g", "l_s"} (those in `terms`).

    r_bn needs `model` (for the conv weights); l_g and l_s need `captured`. R_bn sums over layers;
    L_g and L_s average the layers they act on (options.layer_reduction 'mean', the authors' code)
    or sum them ('sum').
    """
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise InputError(f"unknown CGL term(s) {sorted(unknown)}; valid: {TERMS}")
    device = _device_of(captured, model)
    sums: dict[str, list[torch.Tensor]] = {t: [] for t in terms}
    if "r_bn" in terms:
        if model is None:
            raise InputError("cgl_terms: the block norm r_bn needs the model (model=...)")
        modules = dict(model.named_modules())
        sums["r_bn"] = [block_norm(modules[lg.name].weight, lg.spec) for lg in layer_groups]
    spatial = set(options.spatial_layer_names(layer_groups)) if "l_s" in terms else set()
    for lg in layer_groups:
        need_g, need_s = "l_g" in terms, lg.name in spatial
        if not (need_g or need_s):
            continue
        psi = scale(_capture_of(captured, lg.name))  # (N, C, H, W)
        if need_g:
            pairs = sample_pairs(lg.spec, generator, options.pairs_per_filter)
            sums["l_g"].append(group_activation_loss(psi, lg.spec, pairs, options.group_form))
        if need_s:
            sums["l_s"].append(spatial_loss(psi, options.spatial_coords))
    def combine(term: str, values: list[torch.Tensor]) -> torch.Tensor:
        if not values:
            return torch.zeros((), device=device)
        stacked = torch.stack(values)
        # R_bn is a sum over layers (eq. 6); L_g and L_s follow options.layer_reduction
        return stacked.mean() if term != "r_bn" and options.layer_reduction == "mean" else stacked.sum()
    return {t: combine(t, v) for t, v in sums.items()}


def _device_of(captured: Mapping[str, Captured], model: nn.Module | None) -> torch.device:
    for cap in captured.values():
        return cap.pre.device
    if model is not None:
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


class CGLObjective(nn.Module):
    """lambda_bn R_bn + lambda_g L_g + lambda_s L_s for a model's grouped layers.

    Holds the shared (P1, P2) and the seeded pair generator; `state_dict()`
    carries both (the generator's state as extra state), so a resumed run draws
    the same pairs. Terms with lambda = 0 are computed without gradient for the
    logs when `monitor` is on (the default, as cgl_train.config.TrainConfig's),
    and skipped when it is off.
    """

    def __init__(self, model: nn.Module, layer_groups: Sequence[LayerGroups], options: CGLOptions,
                 seed: int = 0, monitor: bool = True) -> None:
        super().__init__()
        self.layer_groups = list(layer_groups)
        self.options = options
        self.monitor = monitor
        self.seed = int(seed)
        self.scale = ReceptiveFieldScale(learnable=options.learn_p, eps=options.psi_eps)
        self.generator = torch.Generator().manual_seed(self.seed)
        # monitoring draws its own pairs, so turning it on leaves the training pairs unchanged
        self.monitor_generator = torch.Generator().manual_seed(self.seed + 1)
        # a plain reference, not a submodule: the objective's state_dict stays small
        object.__setattr__(self, "_model", model)
        options.spatial_layer_names(self.layer_groups)  # validate early

    def lambdas(self) -> dict[str, float]:
        """Each term's weight."""
        return {"r_bn": self.options.lambda_bn, "l_g": self.options.lambda_g, "l_s": self.options.lambda_s}

    def needs_activations(self) -> bool:
        """True when L_g or L_s is used (or monitored): run the forward inside GroupActivations."""
        return self.monitor or self.options.lambda_g > 0 or self.options.lambda_s > 0

    def forward(self, captured: Mapping[str, Captured]) -> dict[str, torch.Tensor]:
        """{"total": weighted sum, plus each computed term, unweighted}.

        With block_norm_mode="proximal", r_bn is reported but left out of the
        total: call `proximal_step(lr)` after each optimizer step instead.
        """
        lam = self.lambdas()
        active = [t for t in TERMS if lam[t] > 0]
        out = cgl_terms(captured, self.layer_groups, self.scale, self.generator, self.options,
                        self._model, terms=active) if active else {}
        if self.monitor:
            rest = [t for t in TERMS if t not in active]
            if rest:
                with torch.no_grad():
                    out.update(cgl_terms(captured, self.layer_groups, self.scale, self.monitor_generator,
                                         self.options, self._model, terms=rest))
        total = torch.zeros((), device=_device_of(captured, self._model))
        for term in active:
            if term == "r_bn" and self.options.block_norm_mode == "proximal":
                continue
            total = total + lam[term] * out[term]
        out["total"] = total
        return out

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        """Group soft-threshold each grouped conv with threshold lr * lambda_bn (proximal mode only)."""
        if self.options.block_norm_mode != "proximal" or self.options.lambda_bn == 0:
            return
        modules = dict(self._model.named_modules())
        for lg in self.layer_groups:
            proximal_group_step(modules[lg.name].weight, lg.spec, lr * self.options.lambda_bn)

    @torch.no_grad()
    def relevances(self) -> dict[str, dict[str, Any]]:
        """Per grouped layer: beta (per group), beta_l, and beta_bn (per group) when a BN follows."""
        modules = dict(self._model.named_modules())
        result = {}
        for lg in self.layer_groups:
            weight = modules[lg.name].weight
            beta = group_norms(weight, lg.spec)
            entry: dict[str, Any] = {"beta": beta.tolist(), "beta_l": float(beta.sum()), "beta_bn": None}
            if lg.bn is not None:
                entry["beta_bn"] = group_norms_bn(weight, lg.spec, modules[lg.bn]).tolist()
            result[lg.name] = entry
        return result

    def get_extra_state(self) -> dict[str, Any]:
        """The pair generator's state and the seed (saved with state_dict)."""
        return {"pair_generator": self.generator.get_state(),
                "monitor_generator": self.monitor_generator.get_state(), "seed": self.seed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the pair generator (load_state_dict)."""
        self.generator.set_state(state["pair_generator"])
        self.monitor_generator.set_state(state["monitor_generator"])
        self.seed = int(state["seed"])
