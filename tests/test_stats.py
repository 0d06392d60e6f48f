"""dissect.stats against numpy.quantile, a naive loop tally and a naive sort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from broden.errors import InputError
from dissect import stats
from dissect.stats import INTERPOLATIONS, IoUTally, TopImages, TopQuantile
from dissect.upsample import upsample

# ---------------------------------------------------------------- TopQuantile


def _quantile_data(seed: int = 0) -> torch.Tensor:
    """(N, U, h, w) float32 with awkward units: ties, constant, sorted stream, huge spread."""
    gen = torch.Generator().manual_seed(seed)
    n, u, h, w = 12, 6, 5, 4
    x = torch.randn(n, u, h, w, generator=gen)
    x[:, 1] = torch.randint(0, 6, (n, h, w), generator=gen).float()  # many ties
    x[:, 2] = 3.25  # constant unit
    x[:, 3] = torch.arange(n * h * w, dtype=torch.float32).view(n, h, w)  # increasing: many compactions
    x[:, 4] = torch.randn(n, h, w, generator=gen) * 1e6
    x[:, 5] = -torch.arange(n * h * w, dtype=torch.float32).view(n, h, w)  # decreasing
    return x


def _numpy_quantile(x: torch.Tensor, level: float, method: str) -> np.ndarray:
    values = x.transpose(0, 1).reshape(x.shape[1], -1).double().numpy()  # exact copy of float32
    return np.quantile(values, level, axis=1, method=method)


def _feed(tq: TopQuantile, x: torch.Tensor, batch: int) -> TopQuantile:
    for i in range(0, x.shape[0], batch):
        tq.add(x[i:i + batch])
    return tq


@pytest.mark.parametrize("top_fraction", [0.005, 0.1, 0.37])
@pytest.mark.parametrize("method", INTERPOLATIONS)
def test_top_quantile_equals_numpy_in_any_split(method, top_fraction):
    x = _quantile_data()
    n, u = x.shape[0], x.shape[1]
    total = n * x.shape[2] * x.shape[3]
    expected = _numpy_quantile(x, 1 - top_fraction, method).astype(np.float32)
    results = []
    for batch in (1, 5, n):
        tq = _feed(TopQuantile(u, total, top_fraction, method), x, batch)
        results.append(tq.result())
    # (U, n) rows, in uneven pieces
    rows = x.transpose(0, 1).reshape(u, -1)
    tq = TopQuantile(u, total, top_fraction, method)
    for a, b in ((0, 7), (7, 100), (100, total)):
        tq.add(rows[:, a:b])
    results.append(tq.result())
    # three shards merged
    shards = [_feed(TopQuantile(u, total, top_fraction, method), x[s], 2)
              for s in (slice(0, 3), slice(3, 4), slice(4, n))]
    shards[0].merge(shards[1])
    shards[0].merge(shards[2])
    results.append(shards[0].result())
    for got in results:
        assert got.dtype == torch.float32 and got.shape == (u,)
        if method in ("lower", "higher", "nearest"):
            np.testing.assert_array_equal(got.numpy(), expected)
        else:
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=0)
    assert results[0][2] == 3.25


def test_top_quantile_hazen_clamps_to_max_for_tiny_fractions():
    x = torch.randn(1, 2, 10, 10, generator=torch.Generator().manual_seed(3))
    tq = TopQuantile(2, 100, top_fraction=0.004)  # hazen index 99.1 >= n-1
    tq.add(x)
    np.testing.assert_array_equal(tq.result().numpy(), x.amax(dim=(0, 2, 3)).numpy())


def test_top_quantile_keeps_only_k_values():
    tq = TopQuantile(3, 200_000, top_fraction=0.005)
    # hazen at n*q - 0.5 = 198999.5: needs order statistics 198999 and 199000 -> k = 1001
    assert tq.k == 1001 and tq.capacity == 2002


def test_top_quantile_state_dict_round_trip_mid_stream():
    x = _quantile_data(seed=5)
    total = x.shape[0] * x.shape[2] * x.shape[3]
    full = _feed(TopQuantile(6, total, 0.1), x, 3).result()
    first = _feed(TopQuantile(6, total, 0.1), x[:7], 3)
    state = first.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float, str)) for v in state.values())
    resumed = TopQuantile(6, total, 0.1)
    resumed.load_state_dict(state)
    _feed(resumed, x[7:], 2)
    assert torch.equal(resumed.result(), full)


def test_top_quantile_rejects_incomplete_overfull_and_nan():
    tq = TopQuantile(2, 10)
    tq.add(torch.zeros(2, 6))
    with pytest.raises(InputError, match="incomplete"):
        tq.result()
    with pytest.raises(InputError, match="total_per_unit"):
        tq.add(torch.zeros(2, 5))
    tq.add(torch.tensor([[0.0, 1, 2, float("nan")], [1.0, 2, 3, 4]]))
    with pytest.raises(InputError, match="NaN"):
        tq.result()
    with pytest.raises(InputError, match="interpolation"):
        TopQuantile(2, 10, interpolation="cubic")
    with pytest.raises(InputError, match="units"):
        TopQuantile(2, 10).add(torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------- IoUTally

NUM_LABELS, NUM_CATS = 520, 4


def _label_category() -> torch.Tensor:
    cat = torch.full((NUM_LABELS,), -1, dtype=torch.int64)
    ids = [3, 7, 260, 300, 511, 12, 40, 41]
    for i, c in zip(ids, [0, 1, 1, 2, 2, 3, 3, 0]):
        cat[i] = c
    return cat  # 99 stays -1: an id outside the selected categories


def _tally_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, u, k, sh, sw, m = 5, 4, 3, 6, 7, 3
    pixel_ids = torch.tensor([0, 0, 3, 7, 260, 300, 511, 99])
    labels = pixel_ids[torch.randint(0, len(pixel_ids), (b, k, sh, sw), generator=gen)].int()
    labels[3, 1:] = 0  # image 3 has a single layer
    labels[1, 2] = labels[1, 0]  # the same labels in two layers of one image
    image_ids = torch.tensor([0, 12, 40, 41])
    image_labels = image_ids[torch.randint(0, 4, (b, m), generator=gen)]
    image_labels[2] = 0  # no image-level labels
    image_labels[0] = torch.tensor([12, 41, 0])
    masks = torch.rand(b, u, sh, sw, generator=gen) < 0.3
    masks[:, 3] = False  # a unit that never fires
    masks[4] = False  # an image where nothing fires
    masks[0, 0, :3] = True
    return masks, labels, image_labels


def _naive_tally(masks, labels, image_labels, label_category, union):
    b, u, sh, sw = masks.shape
    cat = label_category.tolist()
    cat[0] = -1
    truth = np.zeros(NUM_LABELS, np.int64)
    inter = np.zeros((u, NUM_LABELS), np.int64)
    act = np.zeros((u, NUM_CATS), np.int64)
    for i in range(b):
        img_ids = [int(v) for v in image_labels[i] if int(v) != 0]
        for lab in img_ids:
            truth[lab] += sh * sw
        for layer in range(labels.shape[1]):
            for y in range(sh):
                for x in range(sw):
                    if int(labels[i, layer, y, x]) != 0:
                        truth[int(labels[i, layer, y, x])] += 1
        anywhere = {cat[lab] for lab in img_ids if cat[lab] >= 0}
        anywhere |= {cat[int(v)] for v in labels[i].flatten() if cat[int(v)] >= 0}
        for unit in range(u):
            size = int(masks[i, unit].sum())
            present = {cat[lab] for lab in img_ids if cat[lab] >= 0}
            for lab in img_ids:
                inter[unit, lab] += size
            for layer in range(labels.shape[1]):
                for y in range(sh):
                    for x in range(sw):
                        lab = int(labels[i, layer, y, x])
                        if masks[i, unit, y, x] and lab != 0:
                            inter[unit, lab] += 1
                            if cat[lab] >= 0:
                                present.add(cat[lab])
            for c in (present if union == "lite" else anywhere):
                act[unit, c] += size
    iou = np.zeros((u, NUM_LABELS))
    for unit in range(u):
        for lab in range(NUM_LABELS):
            if cat[lab] >= 0:
                iou[unit, lab] = inter[unit, lab] / (
                    act[unit, cat[lab]] + truth[lab] - inter[unit, lab] + 1e-10)
    return truth, inter, act, iou.astype(np.float32)


@pytest.mark.parametrize("category_sets", [True, False])
@pytest.mark.parametrize("union", ["lite", "original"])
def test_iou_tally_matches_naive_loops(union, category_sets, monkeypatch):
    if not category_sets:  # the path for more categories than bit-coded sets allow
        monkeypatch.setattr(stats, "_MAX_SET_CATEGORIES", 0)
    masks, labels, image_labels = _tally_data()
    cat = _label_category()
    truth, inter, act, iou = _naive_tally(masks, labels, image_labels, cat, union)
    assert act.any() and inter[:, 3].any() and inter[:, 12].any()

    def check(tally):
        res = tally.result()
        np.testing.assert_array_equal(res["truth"].numpy(), truth)
        np.testing.assert_array_equal(res["intersection"].numpy(), inter)
        np.testing.assert_array_equal(res["activation"].numpy(), act)
        np.testing.assert_allclose(res["iou"].numpy(), iou, rtol=1e-6, atol=0)
        assert res["iou"].dtype == torch.float32 and res["truth"].dtype == torch.int64

    whole = IoUTally(4, cat, NUM_CATS, union=union)
    whole.add(masks, labels, image_labels)
    check(whole)
    # one image at a time, with chunks small enough to split every image's rows
    single = IoUTally(4, cat, NUM_CATS, union=union, chunk_elements=50)
    for i in range(masks.shape[0]):
        single.add(masks[i:i + 1], labels[i:i + 1], image_labels[i:i + 1])
    check(single)
    # shards merged, and a state_dict round trip
    a = IoUTally(4, cat, NUM_CATS, union=union)
    a.add(masks[:2], labels[:2], image_labels[:2])
    b = IoUTally(4, cat, NUM_CATS, union=union)
    b.add(masks[2:], labels[2:], image_labels[2:])
    a.merge(b)
    check(a)
    restored = IoUTally(4, cat, NUM_CATS, union=union)
    restored.load_state_dict(a.state_dict())
    check(restored)
    assert restored.images == masks.shape[0]


@pytest.mark.parametrize("union", ["lite", "original"])
def test_iou_tally_add_activations_equals_dense_masks(union):
    _, labels, image_labels = _tally_data(seed=2)
    gen = torch.Generator().manual_seed(7)
    acts = torch.randn(5, 4, 3, 4, generator=gen)  # upsampled to the 6x7 label size
    acts[:, 2] = -5  # a unit that never reaches its threshold: pruned
    thresholds = torch.tensor([0.5, 0.0, 1.0, -0.2])
    dense = upsample(acts, (6, 7)) > thresholds.view(1, 4, 1, 1)
    assert dense.any() and not dense.all()
    cat = _label_category()
    truth, inter, act, iou = _naive_tally(dense, labels, image_labels, cat, union)
    for chunk in (1 << 24, 100):
        t = IoUTally(4, cat, NUM_CATS, union=union, chunk_elements=chunk)
        t.add_activations(acts[:2], thresholds, labels[:2], image_labels[:2])
        t.add_activations(acts[2:], thresholds, labels[2:], image_labels[2:])
        res = t.result()
        np.testing.assert_array_equal(res["truth"].numpy(), truth)
        np.testing.assert_array_equal(res["intersection"].numpy(), inter)
        np.testing.assert_array_equal(res["activation"].numpy(), act)
        np.testing.assert_allclose(res["iou"].numpy(), iou, rtol=1e-6, atol=0)


def test_iou_tally_unions_differ_where_expected():
    masks, labels, image_labels = _tally_data(seed=1)
    cat = _label_category()
    res = {}
    for union in ("lite", "original"):
        t = IoUTally(4, cat, NUM_CATS, union=union)
        t.add(masks, labels, image_labels)
        res[union] = t.result()
    # "original" counts a category wherever it occurs, so A can only grow; I and G agree
    assert (res["original"]["activation"] >= res["lite"]["activation"]).all()
    assert torch.equal(res["original"]["intersection"], res["lite"]["intersection"])


def test_iou_tally_handles_no_label_layers():
    masks = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    labels = torch.zeros(2, 0, 3, 3, dtype=torch.int32)
    image_labels = torch.tensor([[12], [0]])
    t = IoUTally(2, _label_category(), NUM_CATS)
    t.add(masks, labels, image_labels)
    res = t.result()
    assert res["truth"][12] == 9 and (res["intersection"][:, 12] == 9).all()
    assert (res["activation"][:, 3] == 9).all() and res["activation"].sum() == 18
    np.testing.assert_allclose(res["iou"][:, 12].numpy(), 9 / (9 + 9 - 9 + 1e-10))


def test_iou_tally_rejects_bad_input():
    cat = _label_category()
    t = IoUTally(2, cat, NUM_CATS)
    masks = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    with pytest.raises(InputError, match="labels hold ids"):
        t.add(masks, torch.full((1, 1, 3, 3), NUM_LABELS, dtype=torch.int32),
              torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="masks"):
        t.add(masks.float(), torch.zeros(1, 1, 3, 3, dtype=torch.int32), torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="union"):
        IoUTally(2, cat, NUM_CATS, union="both")
    with pytest.raises(InputError, match="merge"):
        t.merge(IoUTally(2, cat, NUM_CATS, union="original"))


# ---------------------------------------------------------------- TopImages


def _naive_top_images(indices, acts, k):
    scores = acts.amax(dim=(2, 3))  # (N, U)
    out_idx, out_scores, out_maps = [], [], []
    for unit in range(acts.shape[1]):
        order = sorted(range(len(indices)), key=lambda i: (-float(scores[i, unit]), int(indices[i])))[:k]
        out_idx.append([int(indices[i]) for i in order])
        out_scores.append([float(scores[i, unit]) for i in order])
        out_maps.append(torch.stack([acts[i, unit] for i in order]))
    return np.array(out_idx), np.array(out_scores, np.float32), torch.stack(out_maps)


def test_top_images_matches_naive_sort_and_merge():
    gen = torch.Generator().manual_seed(4)
    n, u, h, w, k = 13, 3, 4, 5, 4
    acts = torch.randint(0, 4, (n, u, h, w), generator=gen).float() / 4  # heavy ties in spatial max
    acts[:, 2] = 0.5  # every image ties for unit 2: smallest indices win
    acts += 1 / 3  # not a float16 value: the kept maps must be the float32 maps the tally thresholds
    indices = torch.randperm(100, generator=gen)[:n]
    want_idx, want_scores, want_maps = _naive_top_images(indices, acts, k)

    one = TopImages(u, k)
    for i in range(0, n, 3):
        one.add(indices[i:i + 3], acts[i:i + 3])
    shards = [TopImages(u, k) for _ in range(3)]
    for i in range(n):  # round-robin, reversed order
        j = n - 1 - i
        shards[i % 3].add(indices[j:j + 1], acts[j:j + 1])
    shards[1].merge(shards[0])
    shards[1].merge(shards[2])
    restored = TopImages(u, k)
    restored.load_state_dict(shards[1].state_dict())
    for top in (one, shards[1], restored):
        res = top.result()
        np.testing.assert_array_equal(res["indices"].numpy(), want_idx)
        np.testing.assert_array_equal(res["scores"].numpy(), want_scores)
        assert res["maps"].dtype == torch.float32 and torch.equal(res["maps"], want_maps)
    assert sorted(want_idx[2]) == sorted(indices.tolist())[:k]


def test_top_images_with_fewer_images_than_k():
    acts = torch.tensor([[[[1.0]]], [[[3.0]]]])  # (2, 1, 1, 1)
    top = TopImages(1, k=5)
    top.add(torch.tensor([7, 2]), acts)
    res = top.result()
    assert res["indices"].tolist() == [[2, 7]] and res["scores"].tolist() == [[3.0, 1.0]]
    assert res["maps"].shape == (1, 2, 1, 1)
    with pytest.raises(InputError, match="maps"):
        top.add(torch.tensor([1]), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- CPU == GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    x = _quantile_data(seed=9)
    total = x.shape[0] * x.shape[2] * x.shape[3]
    _, labels, image_labels = _tally_data(seed=3)
    acts = torch.randn(5, 4, 3, 4, generator=torch.Generator().manual_seed(8))
    thresholds = torch.tensor([0.5, 0.0, 1.0, -0.2])
    out = {}
    for dev in ("cpu", "cuda"):
        tq = _feed(TopQuantile(6, total, 0.1, device=dev), x.to(dev), 5)
        tally = IoUTally(4, _label_category(), NUM_CATS, device=dev)
        tally.add_activations(acts.to(dev), thresholds.to(dev), labels.to(dev), image_labels.to(dev))
        tops = TopImages(4, 3, device=dev)
        tops.add(torch.arange(5, device=dev), acts.to(dev))
        res = tally.result()
        out[dev] = [tq.result(), res["intersection"], res["activation"], res["truth"],
                    tops.result()["indices"]]
        assert all(t.device.type == dev for t in out[dev])
    for a, b in zip(out["cpu"], out["cuda"]):
        assert torch.equal(a, b.cpu())


# ---------------------------------------------------------------- fast paths stay exact


@pytest.mark.parametrize("batch", [1, 3, 20])
def test_top_quantile_long_stream_equals_numpy(batch):
    # many batches: cut-to-top-k batches early, floor-only batches later, compactions in between
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(60, 3, 6, 5, generator=gen)
    x[:, 1] = torch.arange(60 * 30, dtype=torch.float32).view(60, 6, 5)  # increasing: floor keeps rising
    x[:, 2] = torch.randint(0, 4, (60, 6, 5), generator=gen).float()  # ties
    total = 60 * 30
    for method in ("hazen", "lower"):
        expected = _numpy_quantile(x, 1 - 0.02, method).astype(np.float32)
        got = _feed(TopQuantile(3, total, 0.02, method), x, batch).result()
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=0)


def test_top_quantile_floor_from_first_batch_and_shifted_batches_stay_exact():
    # the first batch's k-th largest becomes the floor at once; a unit that jumps in later
    # batches (more candidates than k at once) and one that falls below its floor stay exact
    gen = torch.Generator().manual_seed(21)
    x = torch.rand(40, 4, 8, 8, generator=gen)
    x[25:30, 0] += 5.0
    x[10:, 1] *= -1
    total = 40 * 64
    for method in ("hazen", "linear"):
        tq = TopQuantile(4, total, 0.01, method)
        assert 8 * 64 > tq.k  # one batch holds more than the k values kept
        tq.add(x[:8])
        kth = x[:8].transpose(0, 1).reshape(4, -1).topk(tq.k, dim=1).values[:, -1]
        assert torch.equal(tq._floor, kth)
        for i in range(8, 40, 8):
            tq.add(x[i:i + 8])
        expected = _numpy_quantile(x, 0.99, method).astype(np.float32)
        np.testing.assert_allclose(tq.result().numpy(), expected, rtol=1e-6, atol=0)


def test_top_quantile_state_is_not_changed_by_later_adds():
    x = _quantile_data(seed=6)
    total = x.shape[0] * x.shape[2] * x.shape[3]
    tq = _feed(TopQuantile(6, total, 0.1), x[:4], 2)
    state = tq.state_dict()
    fill = state["fill"].clone()
    resumed = TopQuantile(6, total, 0.1)
    resumed.load_state_dict(state)
    _feed(resumed, x[4:], 3)
    assert torch.equal(state["fill"], fill)  # load_state_dict copies what `add` updates in place
    again = TopQuantile(6, total, 0.1)
    again.load_state_dict(state)
    _feed(again, x[4:], 3)
    assert torch.equal(again.result(), resumed.result())


@pytest.mark.parametrize("union", ["lite", "original"])
def test_prepared_labels_serve_several_tallies(union):
    _, labels, image_labels = _tally_data(seed=4)
    gen = torch.Generator().manual_seed(9)
    cat = _label_category()
    maps = {"a": torch.randn(5, 4, 3, 4, generator=gen), "b": torch.randn(5, 2, 6, 7, generator=gen)}
    thresholds = {"a": torch.tensor([0.5, 0.0, 1.0, -0.2]), "b": torch.tensor([0.3, 1.2])}
    shared = IoUTally(4, cat, NUM_CATS, union=union).prepare_labels(labels, image_labels)
    for name, acts in maps.items():
        u = acts.shape[1]
        dense = upsample(acts, (6, 7)) > thresholds[name].view(1, u, 1, 1)
        want = IoUTally(u, cat, NUM_CATS, union=union)
        want.add(dense, labels, image_labels)
        got = IoUTally(u, cat, NUM_CATS, union=union)
        got.add_activations(acts, thresholds[name], shared)
        for key in ("truth", "intersection", "activation"):
            assert torch.equal(got.result()[key], want.result()[key])
    other = IoUTally(4, cat, NUM_CATS, union="original" if union == "lite" else "lite")
    with pytest.raises(InputError, match="LabelBatch"):
        other.add_activations(maps["a"], thresholds["a"], shared)
    with pytest.raises(InputError, match="labels are for"):
        IoUTally(4, cat, NUM_CATS, union=union).add_activations(maps["a"][:2], thresholds["a"], shared)


# ---------------------------------------------------------------- top-image ties by mask area


def _tied_batch():
    """(indices, acts, areas): 8 images of 2 units; unit 0: six images tie at the peak 2.0."""
    acts = torch.zeros(8, 2, 2, 2)
    acts[:, 0, 0, 0] = torch.tensor([2.0, 2.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    acts[:, 1, 0, 0] = torch.arange(8, dtype=torch.float32)  # no ties
    acts += 1 / 3
    areas = torch.zeros(8, 2, dtype=torch.int64)
    areas[:, 0] = torch.tensor([1, 5, 9, 5, 7, 0, 3, 7])
    areas[:, 1] = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2])
    return torch.tensor([10, 11, 12, 13, 14, 15, 16, 17]), acts, areas


def test_top_images_ties_broken_by_area_then_index():
    indices, acts, areas = _tied_batch()
    by_area = TopImages(2, 4, tiebreak="area")
    by_index = TopImages(2, 4)  # the default of the class: the order before the option
    for i in range(0, 8, 3):
        by_area.add(indices[i:i + 3], acts[i:i + 3], areas=areas[i:i + 3])
        by_index.add(indices[i:i + 3], acts[i:i + 3])
    res = by_area.result()
    # peak 2.0 at 10, 11, 13, 14, 15, 17 with areas 1, 5, 5, 7, 0, 7: area desc, then index
    assert res["indices"][0].tolist() == [14, 17, 11, 13]
    assert res["areas"][0].tolist() == [7, 7, 5, 5]
    assert res["indices"][1].tolist() == [17, 16, 15, 14]  # no ties: the area plays no part
    assert torch.equal(res["maps"][0, 0], acts[4, 0]) and torch.equal(res["maps"][1, 0], acts[7, 1])
    assert by_index.result()["indices"][0].tolist() == [10, 11, 13, 14]
    with pytest.raises(InputError, match="areas"):
        TopImages(2, 4, tiebreak="area").add(indices, acts)
    with pytest.raises(InputError, match="tiebreak"):
        TopImages(2, 4, tiebreak="peak")


def test_top_images_area_shards_merge_and_state_round_trip():
    indices, acts, areas = _tied_batch()
    one = TopImages(2, 3, tiebreak="area")
    one.add(indices, acts, areas=areas)
    shards = [TopImages(2, 3, tiebreak="area") for _ in range(3)]
    for i in reversed(range(8)):  # round-robin, reversed order
        shards[i % 3].add(indices[i:i + 1], acts[i:i + 1], areas=areas[i:i + 1])
    shards[2].merge(shards[0])
    shards[2].merge_state(shards[1].state_dict())
    restored = TopImages(2, 3, tiebreak="area")
    restored.load_state_dict(shards[2].state_dict())
    want = one.result()
    for top in (shards[2], restored):
        got = top.result()
        for key in ("indices", "scores", "areas", "maps"):
            assert torch.equal(got[key], want[key]), key
    with pytest.raises(InputError, match="tiebreak"):
        TopImages(2, 3).merge(one)
    with pytest.raises(InputError, match="tiebreak"):
        TopImages(2, 3).load_state_dict(one.state_dict())
    old = {k: v for k, v in TopImages(2, 3).state_dict().items() if k not in ("tiebreak", "areas")}
    with pytest.raises(InputError, match="tiebreak"):  # a state of the format before the option
        TopImages(2, 3).load_state_dict(old)


def test_add_activations_returns_the_mask_area():
    _, labels, image_labels = _tally_data(seed=5)
    acts = torch.randn(5, 4, 3, 4, generator=torch.Generator().manual_seed(2))
    thresholds = torch.tensor([0.5, 0.0, 1.0, -0.2])
    tally = IoUTally(4, _label_category(), NUM_CATS)
    area = tally.add_activations(acts, thresholds, labels, image_labels)
    masks = upsample(acts, labels.shape[2:]) > thresholds[None, :, None, None]
    assert area.dtype == torch.int64 and torch.equal(area, masks.sum(dim=(2, 3)))


def test_label_intersections_equal_the_tally_column_of_each_unit():
    from dissect.label_images import label_intersections

    _, labels, image_labels = _tally_data(seed=6)
    acts = torch.randn(5, 4, 3, 4, generator=torch.Generator().manual_seed(3))
    thresholds = torch.tensor([0.3, -0.1, 0.8, 0.0])
    unit_labels = torch.tensor([3, 12, 0, 300])  # a pixel label, an image-level label, none, a pixel label
    got = label_intersections(acts, thresholds, labels, image_labels, unit_labels, chunk_elements=7)
    assert got.dtype == torch.int64 and got.shape == (5, 4)
    for b in range(5):  # each image alone through the tally: its I[u, label] is the image's intersection
        tally = IoUTally(4, _label_category(), NUM_CATS)
        tally.add_activations(acts[b:b + 1], thresholds, labels[b:b + 1], image_labels[b:b + 1])
        for u, lab in enumerate(unit_labels.tolist()):
            assert int(got[b, u]) == (int(tally.intersection[u, lab]) if lab else 0), (b, u)
    assert got[:, 1].sum() > 0 and got[:, 0].sum() > 0 and not got[:, 2].any()
    assert got[2, 1] == 0  # image 2 has no image-level labels: the pair is skipped, and counts 0
    # a label no image holds, above every id present: skipped everywhere; the others are unchanged
    again = label_intersections(acts, thresholds, labels, image_labels, torch.tensor([600, 12, 0, 300]),
                                chunk_elements=7)
    assert not again[:, 0].any() and torch.equal(again[:, 1:], got[:, 1:])
