"""Concept Group Learning losses (paper section 3; choices in design/cgl.md).

Every function is vectorised over groups, pairs and maps, and numerically safe:
no NaN/inf in values or gradients for all-zero maps, a single image, or a group
of one filter. Reductions run in float32 at least, so AMP half-precision maps
do not overflow.

Speed (benchmarks/cgl_overhead.py): psi, L_g and L_s are autograd Functions with
closed-form backwards that keep only their inputs (and psi), and run on blocks
of maps sized to stay in cache (`_CHUNK_ELEMS`, `_PAIR_CHUNK_ELEMS`; one block
per layer on a GPU). L_g forms the pair differences with embedding_bag (a
weighted sum of two rows), never a (P, N, H*W) gather.
"""
from __future__ import annotations

from dataclasses import dataclass
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


# ---------------------------------------------------------------- chunks that stay in cache

# A chain of torch ops over whole maps streams them through memory once per op; run on blocks of
# rows of about this many elements, each block stays in cache between the ops (psi and L_s measured
# about a quarter faster on one CPU thread). On a GPU one block covers a layer.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 28}
_DEFAULT_CHUNK_ELEMS = 1 << 24
# With several intra-op threads every op is a fork/join of the thread pool, which on a busy
# (oversubscribed) machine waits for a descheduled thread far longer than a block's op takes:
# CPU blocks are then this many times larger, a few per layer (with 2 threads, blocks 4 or 32
# times smaller made the CGL step 4 to 20 times slower on a loaded 2-core machine).
_THREADED_CHUNK_SCALE = 32


def _chunk_budget(table: dict[str, int], device: torch.device) -> int:
    """Elements per block on `device` from a budget table (larger blocks with several CPU threads)."""
    budget = table.get(device.type, _DEFAULT_CHUNK_ELEMS)
    if device.type == "cpu" and torch.get_num_threads() > 1:
        budget *= _THREADED_CHUNK_SCALE
    return budget


def _row_chunks(rows: int, row_elems: int, device: torch.device) -> list[tuple[int, int]]:
    """(start, stop) blocks of `rows` rows of `row_elems` elements, each within the cache budget."""
    step = max(1, _chunk_budget(_CHUNK_ELEMS, device) // max(1, row_elems))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _map_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*C, H*W) rows, one per (image, channel) map (a view when contiguous)."""
    return x.reshape(x.shape[0] * x.shape[1], -1)


def _per_row(values: torch.Tensor, images: int) -> torch.Tensor:
    """A per-channel (C,) tensor repeated for every image: (N*C, 1), aligned with _map_rows."""
    return values.reshape(1, -1).expand(images, -1).reshape(-1, 1)


# ---------------------------------------------------------------- soft receptive field

def _channel_moments(rows: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance (C,) of map rows (N*C, S), in one read.

    Each map's mean and centred sum of squares (computed in cache), combined over
    images by the parallel-variance formula: no large mean cancels, and no
    Welford loop (torch.var measured several times slower on the CPU).
    """
    maps, size = rows.shape
    mean_r = rows.new_empty(maps)
    m2_r = rows.new_empty(maps)
    for r0, r1 in _row_chunks(maps, size, rows.device):
        block = rows[r0:r1]
        mean = block.mean(dim=1, keepdim=True)
        mean_r[r0:r1] = mean.squeeze(1)
        m2_r[r0:r1] = (block - mean).square_().sum(dim=1)
    mean_nc = mean_r.view(images, -1)  # (N, C)
    mean = mean_nc.mean(dim=0)  # equal-size maps: the mean of the means
    var = (m2_r.view(images, -1).sum(dim=0) + size * (mean_nc - mean).square().sum(dim=0)) / (images * size)
    return mean, var


def _sigmoid_affine_rows(rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """sigmoid(rows * scale + shift) for rows (R, S), scale (R, 1), shift a scalar, block by block."""
    out = torch.empty_like(rows)
    for r0, r1 in _row_chunks(rows.shape[0], rows.shape[1], rows.device):
        torch.mul(rows[r0:r1], scale[r0:r1], out=out[r0:r1]).add_(shift).sigmoid_()
    return out


def _sigmoid_grad_rows(grad: torch.Tensor, psi: torch.Tensor, rows: torch.Tensor,
                       need_shift: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """t = grad * psi * (1 - psi), sum_j t * rows and sum_j t per row (R,), block by block."""
    t = torch.empty_like(psi)
    t_x = rows.new_empty(rows.shape[0])
    t_sum = rows.new_empty(rows.shape[0]) if need_shift else None
    for r0, r1 in _row_chunks(rows.shape[0], rows.shape[1], rows.device):
        block = torch.ops.aten.sigmoid_backward.grad_input(grad[r0:r1], psi[r0:r1], grad_input=t[r0:r1])
        t_x[r0:r1] = (block * rows[r0:r1]).sum(dim=1)
        if t_sum is not None:
            t_sum[r0:r1] = block.sum(dim=1)
    return t, t_x, t_sum


def _as_scalar(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.numel() != 1:
        raise InputError(f"P1 and P2 of psi must be scalars, got shape {tuple(value.shape)}")
    return value


class _SoftFieldStd(torch.autograd.Function):
    """psi = sigmoid(p1 * x / (S + eps) + p2), S the per-channel population std of x (N, C, H, W).

    The backward is the closed form of autograd's through S (not detached):
    with t = grad * psi (1 - psi), a = p1 / (S + eps) and T = sum t * x per channel,
        d/dx = t a + k (x - mean),  k = -T a / ((S + eps) S count)  (0 where S = 0),
    d/dp1 = sum T / (S + eps), d/dp2 = sum t. Both directions work block by block
    (two reads of the maps forward, three backward); saves x and psi only.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, eps: float) -> torch.Tensor:
        images = x.shape[0]
        rows = _map_rows(x)  # (N*C, S)
        mean, var = _channel_moments(rows, images)  # (C,), (C,)
        std = _safe_sqrt(var)
        scale = p1 / (std + eps)  # (C,)
        psi = _sigmoid_affine_rows(rows, _per_row(scale, images), p2).view_as(x)
        ctx.save_for_backward(x, psi, mean, std, scale)
        ctx.eps, ctx.shapes = eps, (p1.shape, p2.shape)
        return psi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, psi, mean, std, scale = ctx.saved_tensors
        need_x, need_p1, need_p2 = ctx.needs_input_grad[:3]
        images = x.shape[0]
        rows = _map_rows(x)
        t, t_x, t_sum = _sigmoid_grad_rows(_map_rows(grad), _map_rows(psi), rows, need_p2)
        total = t_x.view(images, -1).sum(dim=0)  # T (C,): dL/d scale
        grad_p1 = (total / (std + ctx.eps)).sum().reshape(ctx.shapes[0]) if need_p1 else None
        grad_p2 = t_sum.sum().reshape(ctx.shapes[1]) if need_p2 else None
        if not need_x:
            return None, grad_p1, grad_p2, None
        k = _safe_div(-total * scale / (std + ctx.eps), std * rows.numel() / mean.numel())  # dL/d var * 2/count
        scale_r, k_r, shift_r = _per_row(scale, images), _per_row(k, images), _per_row(k * mean, images)
        for r0, r1 in _row_chunks(rows.shape[0], rows.shape[1], rows.device):
            t[r0:r1].mul_(scale_r[r0:r1]).addcmul_(rows[r0:r1], k_r[r0:r1]).sub_(shift_r[r0:r1])
        return t.view_as(x), grad_p1, grad_p2, None


class _SigmoidAffine(torch.autograd.Function):
    """psi = sigmoid(x * scale + shift): x (N, C, H, W), scale (C,), shift a scalar tensor.

    Block by block in both directions; saves x, scale and psi only.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        psi = _sigmoid_affine_rows(_map_rows(x), _per_row(scale, x.shape[0]), shift).view_as(x)
        ctx.save_for_backward(x, scale, psi)
        ctx.shift_shape = shift.shape
        return psi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, psi = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        images = x.shape[0]
        t, t_x, t_sum = _sigmoid_grad_rows(_map_rows(grad), _map_rows(psi), _map_rows(x), need_shift)
        grad_scale = t_x.view(images, -1).sum(dim=0) if need_scale else None
        grad_shift = t_sum.sum().reshape(ctx.shift_shape) if need_shift else None
        grad_x = t.mul_(_per_row(scale, images)).view_as(x) if need_x else None
        return grad_x, grad_scale, grad_shift


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
    return _SoftFieldStd.apply(pre, _as_scalar(p1, pre), _as_scalar(p2, pre), float(eps))


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
    scale = _as_scalar(p1, bn_out) / safe_gamma  # (C,)
    return _SigmoidAffine.apply(bn_out, scale, _as_scalar(p2, bn_out))


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


# Pairs are processed in chunks of about this many elements of pair differences: on the CPU a
# chunk then stays in cache, on a GPU one or two chunks cover a layer (few kernel launches).
_PAIR_CHUNK_ELEMS = {"cpu": 1 << 19, "cuda": 1 << 26}


def _pair_chunk(device: torch.device, row_elems: int) -> int:
    """Number of rows of `row_elems` elements per chunk on `device` (at least 1)."""
    return max(1, _chunk_budget(_PAIR_CHUNK_ELEMS, device) // max(1, row_elems))


@dataclass
class _PairPlan:
    """Index tables that let embedding_bag form pair differences and gather their gradients.

    The maps are viewed as a table of N*C rows (image n, channel c) of S = H*W
    values. Difference row b = n*P + p is rows[n*C + left_p] - rows[n*C + right_p]
    (a bag of two rows weighted +1, -1). Gradient row n*C + c is the bag of the
    difference rows of image n whose pair contains c, weighted by +-dL/d diff
    (entries sorted by channel; a channel in no pair gets an empty bag: 0).
    The backward runs on chunks of `units`: (image, group) blocks when every
    pair lies in its group (a block's differences touch only its own rows),
    else whole images.
    """

    images: int
    channels: int
    pairs: int
    diff_index: torch.Tensor  # (N*P*2,): table rows of each difference's two terms
    diff_weight: torch.Tensor  # (2 * longest chunk,): +1, -1, ...
    diff_offsets: torch.Tensor  # (longest chunk,): 0, 2, 4, ...
    entry_pair: torch.Tensor  # (2P,): pair of each gradient entry, sorted by channel
    entry_sign: torch.Tensor  # (2P,): +1 (left) or -1 (right)
    channel_first: torch.Tensor  # (C,): first entry of each channel within an image
    channel_start: list[int]  # (C + 1,): the same, then 2P, on the host (chunk bounds)
    unit_rows: list[int]  # channel offset of each unit within an image, then C
    chunk_rows: int  # difference rows per forward chunk
    chunk_units: int  # units per backward chunk

    @property
    def units_per_image(self) -> int:
        """Backward units per image: 1 (whole images) or G ((image, group) blocks)."""
        return len(self.unit_rows) - 1

    def unit_row(self, unit: int) -> int:
        """First gradient row (n*C + c) of backward unit `unit` (N * units: one past the last row)."""
        image, k = divmod(unit, self.units_per_image)
        return image * self.channels + self.unit_rows[k]

    def entry_of(self, row: int) -> int:
        """First gradient entry of gradient row `row` (n*C + c); N*C: one past the last entry."""
        image, channel = divmod(row, self.channels)
        return image * 2 * self.pairs + self.channel_start[channel]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU-built tensor to `device` without a host sync: a pinned source, non_blocking."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pair_plan(left: torch.Tensor, right: torch.Tensor, images: int, channels: int, row_elems: int,
               like: torch.Tensor, blocks: list[int] | None) -> _PairPlan:
    """The tables for CPU pairs (left, right) (P,) and maps like `like`; `blocks`: group starts, or None."""
    pairs = left.shape[0]
    base = (torch.arange(images, dtype=torch.int64) * channels).view(images, 1)  # (N, 1)
    diff_index = torch.stack([left + base, right + base], dim=-1).reshape(-1)  # (N*P*2,)
    channel = torch.cat([left, right])  # (2P,)
    order = torch.argsort(channel, stable=True)
    entry_pair = torch.cat([torch.arange(pairs), torch.arange(pairs)])[order]
    ones = torch.ones(pairs, dtype=like.dtype)
    entry_sign = torch.cat([ones, -ones])[order]
    counts = torch.bincount(channel, minlength=channels)
    channel_first = torch.cumsum(counts, 0) - counts  # (C,)
    unit_rows = (blocks or [0]) + [channels]
    unit_pairs = pairs // (len(unit_rows) - 1)
    chunk_units = max(1, _pair_chunk(like.device, unit_pairs * row_elems))
    # forward chunks: rows of differences within budget; a backward chunk may need more (>= 1 unit)
    chunk = min(_pair_chunk(like.device, row_elems), images * pairs)
    longest = min(max(chunk, chunk_units * unit_pairs), images * pairs)
    weight = torch.tensor([1.0, -1.0], dtype=like.dtype).repeat(longest)
    offsets = torch.arange(0, 2 * longest, 2, dtype=torch.int64)
    moved = [_to_device(x, like.device) for x in (diff_index, weight, offsets, entry_pair, entry_sign, channel_first)]
    return _PairPlan(images, channels, pairs, *moved, channel_start=[*channel_first.tolist(), 2 * pairs],
                     unit_rows=unit_rows, chunk_rows=chunk, chunk_units=chunk_units)


def _row_l1(rows: torch.Tensor) -> torch.Tensor:
    """sum |rows| per row (R,), block by block (abs + sum: linalg.vector_norm(ord=1) is slower on the CPU)."""
    out = rows.new_empty(rows.shape[0])
    for r0, r1 in _row_chunks(rows.shape[0], rows.shape[1], rows.device):
        out[r0:r1] = rows[r0:r1].abs().sum(dim=1)
    return out


def _bag_sum(table: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor,
             weight: torch.Tensor) -> torch.Tensor:
    """Row b = sum of weight[k] * table[index[k]] over k in offsets[b] .. offsets[b+1]-1 (an empty bag is 0)."""
    # torch.embedding_bag without F.embedding_bag's argument checks (called per chunk); mode 0 = sum
    return torch.embedding_bag(table, index, offsets, False, 0, False, weight)[0]


def _pair_differences(table: torch.Tensor, plan: _PairPlan, start: int, stop: int) -> torch.Tensor:
    """Difference rows start..stop-1 (see _PairPlan): (stop - start, S)."""
    k = stop - start
    return _bag_sum(table, plan.diff_index[2 * start:2 * stop], plan.diff_offsets[:k], plan.diff_weight[:2 * k])


def _gradient_bags(plan: _PairPlan, grad_diff: torch.Tensor, per_image: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every image: each gradient entry's difference row and weight (N * 2P,), and the row starts (N*C + 1,)."""
    n, device = plan.images, grad_diff.device
    gd = grad_diff if per_image else grad_diff.view(-1, 1).expand(plan.pairs, n)  # (P, N)
    weight = (gd.t()[:, plan.entry_pair] * plan.entry_sign).reshape(-1)  # (N * 2P,)
    image = torch.arange(n, device=device).view(n, 1)
    entry_row = (image * plan.pairs + plan.entry_pair).reshape(-1)  # (N * 2P,)
    starts = (image * 2 * plan.pairs + plan.channel_first).reshape(-1)  # (N*C,)
    return entry_row, weight, torch.cat([starts, torch.full((1,), n * 2 * plan.pairs, device=device)])


class _PairL1(torch.autograd.Function):
    """L1 norms of grouped channels and of differences of channel pairs, without storing the differences.

    forward(maps (N, C, S), grouped, per_image, plan) -> (diff, norms):
    diff = sum |maps[:, left] - maps[:, right]| for the plan's pairs and norms =
    sum |maps[:, :grouped]|, over (N, S) (shapes (P,), (Cg,)) or over S only when
    per_image (shapes (P, N), (Cg, N)). Differences are formed by embedding_bag,
    chunk by chunk, in cache; the backward recomputes their signs chunk by chunk
    and gathers them per channel with a second embedding_bag (no scatter), so
    the autograd graph holds only `maps`. sign(0) = 0, as abs's backward.
    """

    @staticmethod
    def forward(ctx: Any, maps: torch.Tensor, grouped: int, per_image: bool,
                plan: _PairPlan) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, s = maps.shape
        # detached: embedding_bag then takes its forward-only path (no bookkeeping for a backward)
        table = maps.detach().view(n * c, s)
        norms = _row_l1(table).view(n, c)[:, :grouped]  # (N, Cg)
        norms = norms if per_image else norms.sum(dim=0)  # (N, Cg) or (Cg,)
        rows = n * plan.pairs
        diff = maps.new_empty(rows)
        for start in range(0, rows, plan.chunk_rows):
            stop = min(start + plan.chunk_rows, rows)
            diff[start:stop] = _pair_differences(table, plan, start, stop).abs_().sum(dim=1)
        diff = diff.view(n, plan.pairs)
        ctx.save_for_backward(maps)
        ctx.per_image, ctx.plan, ctx.grouped = per_image, plan, grouped
        if per_image:
            return diff.t(), norms.t().contiguous()  # (P, N), (Cg, N)
        return diff.sum(dim=0), norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_diff: torch.Tensor | None,
                 grad_norms: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None]:
        (maps,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        plan, n, c, s = ctx.plan, *maps.shape
        table = maps.detach().view(n * c, s)
        if grad_diff is None:
            grad_diff = maps.new_zeros((plan.pairs, n) if ctx.per_image else (plan.pairs,))
        entry_row, entry_weight, row_start = _gradient_bags(plan, grad_diff, ctx.per_image)
        norm_weight = _norm_weights(grad_norms, n, c, ctx.grouped, ctx.per_image, maps)
        grad = torch.empty_like(table)
        unit_pairs = plan.pairs // plan.units_per_image
        units = n * plan.units_per_image
        for u0 in range(0, units, plan.chunk_units):
            u1 = min(u0 + plan.chunk_units, units)
            d0 = u0 * unit_pairs  # the chunk's difference rows: d0 .. u1 * unit_pairs - 1
            r0, r1 = plan.unit_row(u0), plan.unit_row(u1)  # its gradient rows
            e0, e1 = plan.entry_of(r0), plan.entry_of(r1)  # their entries
            signs = _pair_differences(table, plan, d0, u1 * unit_pairs).sign_()
            rows = _bag_sum(signs, entry_row[e0:e1] - d0, row_start[r0:r1] - e0, entry_weight[e0:e1])
            grad[r0:r1] = rows.addcmul_(table[r0:r1].sign(), norm_weight[r0:r1])
        return grad.view(n, c, s), None, None, None


def _norm_weights(grad_norms: torch.Tensor | None, n: int, c: int, grouped: int, per_image: bool,
                  like: torch.Tensor) -> torch.Tensor:
    """dL/d norm of every (image, channel) row (N*C, 1); free channels (and no gradient) 0."""
    weight = like.new_zeros(n, c)
    if grad_norms is not None:
        weight[:, :grouped] = grad_norms.t() if per_image else grad_norms
    return weight.view(-1, 1)


def _within_groups(pairs: torch.Tensor, spec: GroupSpec) -> bool:
    """True when every pair of group g lies in group g's channels (always so for sample_pairs)."""
    group = torch.arange(spec.groups, dtype=pairs.dtype).view(-1, 1, 1)
    return bool(((pairs // spec.size) == group).all())


def group_activation_loss(psi: torch.Tensor, spec: GroupSpec, pairs: torch.Tensor,
                          form: str = "paper") -> torch.Tensor:
    """L_g of one layer: sum over groups of the mean over its pairs of D(psi_i, psi_j) (eq. 5).

    form="paper": the L1 norms run over the minibatch and space together (one
    ratio per pair); form="per_image": one ratio per image, then the mean over
    images (the authors' code). psi (N, C, H, W); pairs (G, r, 2) channel indices,
    best on the CPU as sample_pairs draws them (their index tables are built there).
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
    n, c = psi.shape[0], psi.shape[1]
    maps = psi.contiguous().view(n, c, -1)  # (N, C, S)
    cpu_pairs = pairs.cpu()
    # (image, group) chunks in the backward need every pair inside its group; else whole images
    blocks = [g * spec.size for g in range(groups)] if _within_groups(cpu_pairs, spec) else None
    flat = cpu_pairs.reshape(-1, 2)  # (G*r, 2)
    plan = _pair_plan(flat[:, 0].contiguous(), flat[:, 1].contiguous(), n, c, maps.shape[2], psi, blocks)
    diff, norms = _PairL1.apply(maps, spec.grouped, form == "per_image", plan)  # (P,)|(P, N), (Cg,)|(Cg, N)
    left, right = _to_device(flat, psi.device).unbind(dim=1)
    den = norms.index_select(0, left) + norms.index_select(0, right) + diff
    dist = _safe_div(2 * diff, den)  # (P,) or (P, N)
    if form == "per_image":
        dist = dist.mean(dim=1)  # (P,)
    return dist.view(groups, r).mean(dim=1).sum()


# ---------------------------------------------------------------- spatial loss

def _spread_block(maps: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spread, mass) (k,) and the offsets dy (k, H), dx (k, W) from the centroid, of maps (k, H, W)."""
    row_mass = maps.sum(dim=2)  # (k, H)
    mass = row_mass.sum(dim=1)  # (k,)
    cy = _safe_div(row_mass @ rows, mass)
    cx = _safe_div(maps.sum(dim=1) @ cols, mass)
    dy = rows - cy.unsqueeze(-1)  # (k, H)
    dx = cols - cx.unsqueeze(-1)  # (k, W)
    spread = _safe_div(_distance(dy, dx).mul_(maps).sum(dim=(1, 2)), mass)
    return spread, mass, dy, dx


def _spread_grad_block(maps: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, inv_mass: torch.Tensor,
                       spread: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- t * d spread / d maps (k, H, W), from the forward's per-map vectors (see _SpatialSpread)."""
    dist = _distance(dy, dx)  # (k, H, W), recomputed rather than stored
    # psi / d: where d = 0 the quotient is inf or nan; those terms count 0 (zero-safe sqrt)
    q = torch.div(maps, dist).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    ay = -(q.sum(dim=2) * dy).sum(dim=1) * inv_mass  # (k,): v_y / mass
    ax = -(q.sum(dim=1) * dx).sum(dim=1) * inv_mass  # (k,): v_x / mass
    row_term = t.unsqueeze(-1) * (ay.unsqueeze(-1) * dy - spread.unsqueeze(-1))  # (k, H)
    col_term = (t * ax).unsqueeze(-1) * dx  # (k, W)
    grad = torch.mul(dist, t.view(-1, 1, 1), out=out)
    grad += row_term.unsqueeze(-1)
    grad += col_term.unsqueeze(-2)
    return grad


class _SpatialSpread(torch.autograd.Function):
    """spread (N, C) = sum_j psi_j |j - c|_2 / sum_j psi_j, c = sum_j j psi_j / sum_j psi_j, per map.

    forward(psi (N, C, H, W), rows (H,), cols (W,)). The centroid comes from
    separable row and column sums. The backward is the closed form
        d spread / d psi_j = (d_j - spread + v . (j - c) / mass) / mass,
        v = sum_k psi_k (c - j_k) / d_k  (terms with d_k = 0 count 0, as sqrt's zero-safe gradient),
    whose linear part in j is again separable. Both directions run on blocks
    of maps that stay in cache; the distance maps d are recomputed in the
    backward rather than stored, so only psi and per-map vectors are kept.
    A map of zero mass has spread 0 and gradient 0.
    """

    @staticmethod
    def forward(ctx: Any, psi: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        n, c, h, w = psi.shape
        maps = psi.reshape(n * c, h, w)
        spread, mass = psi.new_empty(n * c), psi.new_empty(n * c)
        dy, dx = psi.new_empty(n * c, h), psi.new_empty(n * c, w)
        for r0, r1 in _row_chunks(n * c, h * w, psi.device):
            spread[r0:r1], mass[r0:r1], dy[r0:r1], dx[r0:r1] = _spread_block(maps[r0:r1], rows, cols)
        ctx.save_for_backward(psi, mass, dy, dx, spread)
        return spread.view(n, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        psi, mass, dy, dx, spread = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        n, c, h, w = psi.shape
        maps = psi.reshape(n * c, h, w)
        out = torch.empty_like(maps)
        inv_mass = _safe_div(torch.ones_like(mass), mass)  # (N*C,), 0 for an empty map
        t = grad.reshape(-1) * inv_mass  # (N*C,)
        for r0, r1 in _row_chunks(n * c, h * w, psi.device):
            r = slice(r0, r1)
            _spread_grad_block(maps[r], dy[r], dx[r], inv_mass[r], spread[r], t[r], out[r])
        return out.view_as(psi), None, None


def _distance(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """|j - c|_2 maps (k, H, W) from the row and column offsets dy (k, H), dx (k, W)."""
    return torch.add((dy * dy).unsqueeze(-1), (dx * dx).unsqueeze(-2)).sqrt_()


def _coordinates(h: int, w: int, coords: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (H,) and column (W,) coordinates of L_s: pixels, or divided by max(H, W) when normalized."""
    scale = float(max(h, w)) if coords == "normalized" else 1.0
    rows = torch.arange(h, device=like.device, dtype=like.dtype) / scale
    cols = torch.arange(w, device=like.device, dtype=like.dtype) / scale
    return rows, cols


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
    rows, cols = _coordinates(psi.shape[2], psi.shape[3], coords, psi)
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
    grouping = set(options.group_layer_names(layer_groups)) if "l_g" in terms else set()
    for lg in layer_groups:
        need_g, need_s = lg.name in grouping, lg.name in spatial
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
        options.group_layer_names(self.layer_groups)

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
