"""cgl_train engine, data, config and CLI on tiny seeded data (tiny_cnn with 8/16 filters)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from broden.errors import InputError
from broden.synthetic import generate_shapes_dataset, load_classes
from dissect.checkpoint import load_checkpoint
from cgl_train.cli import main
from cgl_train.config import TrainConfig, parse_layer_ints
from cgl_train.data import IMAGENET_NORMALIZATION, SyntheticShapes, build_datasets
from cgl_train.engine import (TERM_NAMES, BatchLoader, StepMetrics, build_loaders, build_trainer, evaluate,
                              lr_at, read_log, train, train_one_epoch, train_step)
from cgl_train.groups import GroupActivations
from cgl_train.losses import cgl_terms, sample_pairs
from cgl_train.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """45 images of 32 px (36 train, 9 val), the generator users get."""
    return generate_shapes_dataset(tmp_path_factory.mktemp("synth") / "shapes", per_class=1, size=32,
                                   seed=0, progress=False)


def config(shapes: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data="synthetic", synthetic_dir=str(shapes), synthetic_per_class=1, synthetic_size=32,
                out=str(out), arch_kwargs={"width1": 8, "width2": 16}, groups=4, epochs=1, batch_size=12,
                workers=0, quiet=True, synthetic_normalization="half")
    base.update(kw)
    return TrainConfig(**base)


def test_train_stats_normalisation_is_the_training_splits_pixel_statistics(shapes, tmp_path):
    from cgl_train.data import build_datasets

    cfg = config(shapes, tmp_path, synthetic_normalization="train_stats")
    data = build_datasets(cfg, progress=False)
    table = load_classes(shapes)
    pixels = np.stack([np.asarray(Image.open(shapes / "images" / p).convert("RGB"), dtype=np.float64) / 255
                       for p in table[table["split"] == "train"]["image"]])  # (N, H, W, 3)
    assert data.normalization["mean"] == pytest.approx(pixels.mean(axis=(0, 1, 2)).tolist(), rel=1e-12)
    assert data.normalization["std"] == pytest.approx(pixels.std(axis=(0, 1, 2)).tolist(), rel=1e-12)
    assert data.val.normalization == data.normalization  # validation uses the training split's numbers
    x, _ = data.train[0]
    assert abs(float(x.mean())) < 1.0  # roughly centred, where 'half' leaves white at +1
    result = train(cfg)
    assert load_checkpoint(result.latest)["normalization"] == data.normalization  # what dissections apply


def image_folder(root: Path, classes: int = 2, per_class: int = 3, size: tuple[int, int] = (40, 48),
                 seed: int = 0) -> Path:
    """A seeded ImageFolder root (train/ and val/ with `classes` class folders of random PNGs)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root


def batch(shapes: Path, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ds = SyntheticShapes(shapes, "train", "binary")
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------- optimisation

def test_a_few_steps_on_a_fixed_batch_lower_the_full_objective(shapes, tmp_path):
    cfg = config(shapes, tmp_path, lambda_bn=1e-2, lambda_g=1e-1, lambda_s=1e-2, lr=0.05)
    trainer = build_trainer(cfg, num_classes=2, input_size=32, device=CPU)
    x, y = batch(shapes)
    lam = {"r_bn": cfg.lambda_bn, "l_g": cfg.lambda_g, "l_s": cfg.lambda_s}

    def objective() -> float:
        # the same pairs before and after: a fixed generator of its own
        net = trainer.net
        with torch.no_grad(), GroupActivations(net, trainer.layer_groups) as acts:
            task = F.cross_entropy(net(x), y)
            terms = cgl_terms(acts.captured, trainer.layer_groups, trainer.objective.scale,
                              torch.Generator().manual_seed(7), trainer.objective.options, model=net)
        return float(task + sum(lam[k] * v for k, v in terms.items()))

    before = objective()
    with GroupActivations(trainer.net, trainer.layer_groups, copy=False) as acts:
        for _ in range(15):
            values = train_step(trainer, x, y, acts)
    after = objective()
    assert all(torch.isfinite(v) for v in values.terms.values())
    assert values.count.item() == 12 and 0 <= values.correct.item() <= 12
    assert after < before


def test_weight_decay_skips_exactly_what_r_bn_covers(shapes, tmp_path):
    # conv1: 8 filters in 3 groups of 2 + 2 free; conv2: 16 in 3 groups of 5 + 1 free
    cfg = config(shapes, tmp_path, groups=3, lambda_bn=0.5, weight_decay=0.1, lr=0.1, momentum=0.0,
                 monitor=False)
    trainer = build_trainer(cfg, num_classes=2, input_size=32, device=CPU)
    ref = copy.deepcopy(trainer.net)
    x, y = batch(shapes, 6)
    # independent: R_bn by a loop over groups, gradient by autograd, SGD update by hand
    r_bn = 0
    covered = {}
    for name, f, groups in (("conv1", 2, 3), ("conv2", 5, 3)):
        w = getattr(ref, name).weight
        for g in range(groups):
            r_bn = r_bn + torch.sqrt((w[g * f:(g + 1) * f] ** 2).sum())
        mask = torch.ones(w.shape[0], 1, 1, 1)
        mask[: groups * f] = 0  # grouped filters: no weight decay
        covered[f"{name}.weight"] = mask
    loss = F.cross_entropy(ref(x), y) + 0.5 * r_bn
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in ref.named_parameters()])
    expected = {}
    for n, p, g in zip(names, (p for _, p in ref.named_parameters()), grads):
        decay = 0.1 * p.detach() * covered.get(n, 1.0)
        expected[n] = p.detach() - 0.1 * (g + decay)

    values = train_step(trainer, x, y, None)
    got = dict(trainer.net.named_parameters())
    for n in names:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    # terms not computed (lambda 0, monitoring off) are NaN; task and r_bn are the values above
    assert math.isnan(values.terms["l_g"]) and math.isnan(values.terms["l_s"])
    assert values.terms["r_bn"].item() == pytest.approx(float(r_bn.detach()), rel=1e-5)
    assert values.terms["total"].item() == pytest.approx(float(loss.detach()), rel=1e-5)


def test_proximal_mode_zeroes_groups_below_the_threshold_and_spares_free_filters(shapes, tmp_path):
    # threshold lr * lambda_bn = 0.1 * 100 exceeds every group norm of the fresh init
    cfg = config(shapes, tmp_path, groups=3, lambda_bn=100.0, block_norm_mode="proximal", lr=0.1, monitor=False)
    trainer = build_trainer(cfg, num_classes=2, input_size=32, device=CPU)
    x, y = batch(shapes, 4)
    train_step(trainer, x, y, None)
    w1, w2 = trainer.net.conv1.weight, trainer.net.conv2.weight
    assert torch.count_nonzero(w1[:6]) == 0 and torch.count_nonzero(w2[:15]) == 0
    assert torch.count_nonzero(w1[6:]) > 0 and torch.count_nonzero(w2[15:]) > 0


def test_proximal_step_is_skipped_with_a_step_the_grad_scaler_skips(shapes, tmp_path):
    cfg = config(shapes, tmp_path, groups=3, lambda_bn=100.0, block_norm_mode="proximal", lr=0.1, monitor=False)
    x, y = batch(shapes, 4)
    results = {}
    for poison in (False, True):
        trainer = build_trainer(cfg, num_classes=2, input_size=32, device=CPU)
        # an enabled scaler on the CPU: it checks the gradients for inf/NaN like a CUDA AMP run
        trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
        before = [p.detach().clone() for p in trainer.net.parameters()]
        if poison:
            trainer.net.conv1.weight.register_hook(lambda g: g * float("inf"))
        train_step(trainer, x, y, None)
        after = list(trainer.net.parameters())
        results[poison] = all(torch.equal(a, b) for a, b in zip(before, after))
        if not poison:  # a clean step: the proximal step zeroes the groups, as in the test above
            assert torch.count_nonzero(trainer.net.conv1.weight[:6]) == 0
    assert results == {False: False, True: True}  # the skipped step changed no weight


def test_lr_schedules_by_hand(shapes, tmp_path):
    c = config(shapes, tmp_path, lr=0.2, epochs=4)
    assert [lr_at(c, e) for e in range(4)] == pytest.approx([0.2, 0.2 * (1 + math.cos(math.pi / 4)) / 2,
                                                             0.1, 0.2 * (1 + math.cos(3 * math.pi / 4)) / 2])
    c = config(shapes, tmp_path, lr=0.2, lr_schedule="step", lr_step=2, lr_gamma=0.5, epochs=5)
    assert [lr_at(c, e) for e in range(5)] == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05])
    c = config(shapes, tmp_path, lr=0.2, lr_schedule="constant")
    assert lr_at(c, 3) == 0.2


@pytest.mark.parametrize("num_classes", [6, 3])
def test_evaluate_matches_a_naive_top_k(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(11, num_classes, generator=g)
    labels = torch.randint(0, num_classes, (11,), generator=g)
    model = nn.Linear(num_classes, num_classes, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(num_classes))  # the model returns its input as logits
    loader = DataLoader(TensorDataset(logits, labels), batch_size=4)
    got = evaluate(model, loader, CPU, num_classes)
    top1 = top5 = 0
    nll = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(num_classes), key=lambda k: -row[k])
        top1 += order[0] == y
        top5 += y in order[:5]
        nll += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    assert got["val_top1"] == pytest.approx(top1 / 11)
    assert got["val_loss"] == pytest.approx(nll / 11, rel=1e-5)
    assert got["val_images"] == 11
    if num_classes >= 5:
        assert got["val_top5"] == pytest.approx(top5 / 11)
    else:
        assert got["val_top5"] is None


# ---------------------------------------------------------------- checkpoints and resume

def test_checkpoint_round_trip_rebuilds_the_same_model(shapes, tmp_path):
    cfg = config(shapes, tmp_path / "run", lambda_bn=1e-3, labeling="classes45")
    result = train(cfg)
    ckpt = load_checkpoint(result.latest)
    assert ckpt["arch"] == "tiny_cnn" and ckpt["epoch"] == 1 and ckpt["seed"] == 0
    assert ckpt["arch_kwargs"] == {"width1": 8, "width2": 16, "num_classes": 45, "input_size": 32}
    assert ckpt["groups"] == {"conv1": {"groups": 4, "free": 0, "channels": 8},
                              "conv2": {"groups": 4, "free": 0, "channels": 16}}
    assert ckpt["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert ckpt["input_size"] == 32
    assert ckpt["train_options"] == cfg.to_dict()
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    data = build_datasets(cfg, progress=False)
    again = evaluate(model, DataLoader(data.val, batch_size=5), CPU, 45)
    # the same weights give the same validation numbers as the run recorded
    assert again["val_top1"] == ckpt["metrics"]["val_top1"]
    assert again["val_top5"] == ckpt["metrics"]["val_top5"] is not None
    assert again["val_loss"] == pytest.approx(ckpt["metrics"]["val_loss"], rel=1e-6)
    dmodels = pytest.importorskip("dissect.models")
    loaded = dmodels.load_model(result.latest)
    x, _ = batch(shapes, 3)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model.eval()(x))
    assert loaded.groups == ckpt["groups"]


def test_resume_continues_exactly_like_an_uninterrupted_run(shapes, tmp_path):
    # a 'step' schedule does not depend on `epochs`, so 2 + 1 epochs must equal 3; lr_step = 2 makes
    # the resumed epoch the first one at the lower rate
    kw = dict(lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3, epochs=3, lr_schedule="step", lr_step=2,
              lr_gamma=0.5)
    full = train(config(shapes, tmp_path / "full", **kw))
    assert [h["lr"] for h in full.history] == pytest.approx([0.01, 0.01, 0.005])
    train(config(shapes, tmp_path / "split", **{**kw, "epochs": 2}))
    with pytest.raises(InputError, match="--resume"):  # a finished run is never overwritten silently
        train(config(shapes, tmp_path / "split", **kw))
    with pytest.raises(InputError, match="lambda_g"):  # resuming must not change what is computed
        train(config(shapes, tmp_path / "split", **{**kw, "lambda_g": 0.5, "resume": True}))
    resumed = train(config(shapes, tmp_path / "split", **kw, resume=True))
    a, b = load_checkpoint(full.latest), load_checkpoint(resumed.latest)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    strip = [{k: v for k, v in h.items() if k != "time"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "time"} for h in resumed.history] == strip
    lines = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["header"] is True
    assert [{k: v for k, v in json.loads(s).items() if k != "time"} for s in lines[1:]] == strip
    header, entries = read_log(tmp_path / "split" / "log.jsonl")
    assert [{k: v for k, v in h.items() if k != "time"} for h in entries] == strip
    assert header["config"] == config(shapes, tmp_path / "split", **kw, resume=True).to_dict()
    # a finished run has nothing to resume
    with pytest.raises(InputError, match="already completed 3 epoch"):
        train(config(shapes, tmp_path / "split", **kw, resume=True))


def test_resume_refuses_to_change_epochs_under_the_cosine_schedule(shapes, tmp_path):
    # cosine anneals to 0 at `epochs`: 1 + 1 epochs would use other rates than a 2-epoch run
    first = config(shapes, tmp_path / "cos", epochs=1, max_train_batches=1, max_val_batches=1)
    train(first)
    with pytest.raises(InputError, match=r"epochs 1 -> 2.*'cosine'.*depends on the number of epochs"):
        train(first.replace(epochs=2, resume=True))
    header, entries = read_log(tmp_path / "cos" / "log.jsonl")
    assert [e["epoch"] for e in entries] == [1]  # the refused resume wrote nothing


# ---------------------------------------------------------------- CLI, log and config

def test_cli_run_writes_a_log_with_every_term(shapes, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["--data", "synthetic", "--synthetic-dir", str(shapes), "--synthetic-per-class", "1",
                 "--synthetic-size", "32", "--arch-kwargs", '{"width1": 8, "width2": 16}', "--out", str(out),
                 "--epochs", "2", "--batch-size", "12", "--workers", "0", "--groups", "2,conv2=4",
                 "--lambda-bn", "1e-3", "--lambda-g", "1e-2", "--seed", "5", "--quiet"])
    assert code == 0
    assert str(out / "latest.pth") in capsys.readouterr().out
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    header, entries = lines[0], lines[1:]
    # the first line says what produced the epoch lines: seed, every option, versions
    assert header["header"] is True and header["seed"] == 5
    assert header["config"] == json.loads((out / "config.json").read_text())
    assert header["config"]["seed"] == 5 and header["config"]["lambda_g"] == 1e-2
    assert header["cgl_options"]["lambda_bn"] == 1e-3
    assert header["versions"]["torch"] == torch.__version__
    assert header["torch_threads"] == torch.get_num_threads()  # float sums depend on it: recorded
    from dissect.provenance import software_versions  # the dissection's versions block, field for field
    assert header["versions"] == software_versions() and {"torchvision", "pillow"} <= set(header["versions"])
    assert header["world_size"] == 1 and header["data"]["train_images"] == 36
    assert all("header" not in e for e in entries)
    assert [e["epoch"] for e in entries] == [1, 2]
    for e in entries:
        for key in ("task", "r_bn", "l_g", "l_s", "total", "train_top1", "val_top1", "lr", "time"):
            assert isinstance(e[key], float), key
        assert e["val_top5"] is None  # binary labeling: fewer than 5 classes
        # lambda_s = 0: L_s is monitored for the log but not part of the objective
        assert e["total"] == pytest.approx(e["task"] + 1e-3 * e["r_bn"] + 1e-2 * e["l_g"], rel=1e-9)
    ckpt = load_checkpoint(out / "latest.pth")
    assert ckpt["groups"]["conv1"]["groups"] == 2 and ckpt["groups"]["conv2"]["groups"] == 4
    rel = entries[-1]["relevance"]
    for name, groups in (("conv1", 2), ("conv2", 4)):
        w = ckpt["state_dict"][f"{name}.weight"]
        f = w.shape[0] // groups
        naive = [float(torch.linalg.vector_norm(w[g * f:(g + 1) * f])) for g in range(groups)]
        assert rel[name]["beta"] == pytest.approx(naive, rel=1e-5)
        assert rel[name]["beta_l"] == pytest.approx(sum(naive), rel=1e-5)
    assert entries[-1]["r_bn"] > 0
    assert json.loads((out / "config.json").read_text())["group_overrides"] == {"conv2": 4}


@pytest.mark.parametrize("argv, words", [
    (["--arch", "resnet9000"], ["resnet9000", "alexnet_b", "tiny_cnn", "vgg16"]),
    (["--groups", "conv1=five"], ["--groups", "conv1=five"]),
    (["--lambda-g", "-1"], ["lambda_g", "non-negative"]),
    (["--lr-schedule", "linear"], ["lr-schedule", "cosine"]),
    (["--group-form", "pairs"], ["paper", "per_image"]),
    (["--arch-kwargs", "{bad"], ["--arch-kwargs", "'{bad'", "expected a JSON object", '{"width1": 64}']),
    (["--arch-kwargs", "[64]"], ["--arch-kwargs", "expected a JSON object", '{"width1": 64}']),
])
def test_cli_exits_2_on_a_bad_option_value_and_says_what_is_valid(argv, words, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not (tmp_path / "x").exists()


def test_cli_resume_with_only_out_continues_a_run_started_with_non_default_flags(shapes, tmp_path, capsys):
    flags = ["--data", "synthetic", "--synthetic-dir", str(shapes), "--synthetic-per-class", "1",
             "--synthetic-size", "32", "--arch-kwargs", '{"width1": 8, "width2": 16}', "--batch-size", "12",
             "--workers", "0", "--groups", "2,conv2=4", "--lambda-bn", "1e-3", "--lambda-s", "1e-2",
             "--lr", "0.05", "--lr-schedule", "constant", "--seed", "4", "--quiet"]
    assert main(flags + ["--out", str(tmp_path / "full"), "--epochs", "2"]) == 0
    split = str(tmp_path / "split")
    assert main(flags + ["--out", split, "--epochs", "1"]) == 0
    assert main(["--resume", "--out", split, "--lambda-bn", "0.5", "--lr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "lambda_bn: 0.001 -> 0.5" in err and "lr:" not in err  # names what differs, only that
    assert main(["--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no run to resume" in capsys.readouterr().err
    # just --resume --out (+ --epochs, allowed under a constant schedule)
    assert main(["--resume", "--out", split, "--epochs", "2"]) == 0
    a = load_checkpoint(tmp_path / "full" / "latest.pth")
    b = load_checkpoint(Path(split) / "latest.pth")
    assert b["epoch"] == 2 and b["seed"] == 4
    assert b["train_options"] == {**a["train_options"], "out": split, "resume": True}
    assert b["groups"]["conv2"]["groups"] == 4 and b["train_options"]["lambda_s"] == 1e-2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_help_says_weight_decay_applies_to_what_r_bn_does_not_cover(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Weight decay (--weight-decay) applies to every parameter that R_bn does not cover" in text


def test_help_says_ddp_uses_per_rank_minibatch_statistics_for_l_g_and_l_s(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("L_g and L_s do not: they use per-rank minibatch statistics",
                  "This is what the authors' code does, and what BatchNorm without SyncBN does",
                  "equals one process in expectation, not bit for bit"):
        assert words in text, words
    import cgl_train.distributed as distributed
    doc = " ".join(distributed.__doc__.split())
    assert "per-rank minibatch statistics" in doc and "not bit for bit" in doc


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lambda_bn": 0.005, "groups": 8, "epochs": 3, "group_overrides": {"conv1": 2}}))
    from cgl_train.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["--config", str(path), "--epochs", "7",
                                                      "--groups", "conv2=4"]))
    assert (cfg.lambda_bn, cfg.groups, cfg.epochs) == (0.005, 8, 7)
    assert cfg.group_overrides == {"conv1": 2, "conv2": 4}
    assert cfg.lr == TrainConfig().lr
    path.write_text(json.dumps({"lamda_bn": 0.1}))
    with pytest.raises(InputError, match="lamda_bn"):
        TrainConfig.from_json(path)
    assert parse_layer_ints("5,conv2=8", "--groups") == (5, {"conv2": 8})


# ---------------------------------------------------------------- data

def test_synthetic_items_are_normalised_images_with_their_labels(shapes):
    table = load_classes(shapes)
    train_rows = table[table["split"] == "train"]
    for labeling, column in (("binary", "binary"), ("classes45", "class45")):
        ds = SyntheticShapes(shapes, "train", labeling)
        assert len(ds) == len(train_rows) == 36
        x, y = ds[3]
        row = train_rows.iloc[3]
        raw = np.asarray(Image.open(shapes / "images" / row["image"]).convert("RGB"), dtype=np.float64)
        expected = torch.from_numpy((raw / 255.0 - 0.5) / 0.5).permute(2, 0, 1).float()
        assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-6)
        assert y == int(row[column])
    assert len(SyntheticShapes(shapes, "train", "classes45").class_names) == 45


def _per_item_batches(shapes: Path, cfg: TrainConfig, epoch: int, split: str = "train"):
    """Today's per-item path, independently: PNGs decoded by PIL one by one, a DataLoader over them."""
    table = load_classes(shapes)
    rows = table[table["split"] == split]

    class PilItems(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int):
            arr = np.asarray(Image.open(shapes / "images" / rows.iloc[i]["image"]).convert("RGB"))
            img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
            return (img.float() / 255.0 - 0.5) / 0.5, int(rows.iloc[i]["binary"])

    items = PilItems()
    if split == "val":
        return list(DataLoader(items, batch_size=cfg.batch_size, shuffle=False))
    sampler = torch.utils.data.distributed.DistributedSampler(items, num_replicas=1, rank=0, shuffle=True,
                                                              seed=cfg.seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(DataLoader(items, batch_size=cfg.batch_size, sampler=sampler, drop_last=False))


def test_in_memory_batches_equal_the_per_item_path_bit_for_bit(shapes, tmp_path):
    cfg = config(shapes, tmp_path, batch_size=8, seed=3)  # 36 images: 4 batches of 8, then 4
    data = build_datasets(cfg, progress=False)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (36, 3, 32, 32)
    loaders = build_loaders(cfg, data)
    assert isinstance(loaders.train, BatchLoader) and len(loaders.train) == 5
    orders = []
    for epoch in (0, 1, 2):
        loaders.set_epoch(epoch)
        fast = list(loaders.train)
        slow = _per_item_batches(shapes, cfg, epoch)
        assert [len(y) for _, y in fast] == [len(y) for _, y in slow] == [8, 8, 8, 8, 4]
        for (xa, ya), (xb, yb) in zip(fast, slow, strict=True):
            assert xa.dtype == xb.dtype == torch.float32 and torch.equal(xa, xb)
            assert ya.dtype == yb.dtype == torch.int64 and torch.equal(ya, yb)
        orders.append(torch.cat([x.flatten(1).sum(1) for x, _ in fast]))
    assert not torch.equal(orders[0], orders[1])  # a new permutation every epoch
    val = list(loaders.val)
    for (xa, ya), (xb, yb) in zip(val, _per_item_batches(shapes, cfg, 0, "val"), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # an item is the same normalised image as its batch row
    x0, y0 = data.train[5]
    assert torch.equal(x0, data.train.batch(torch.tensor([5]))[0][0]) and y0 == int(data.train.labels[5])


def test_one_epoch_gives_the_same_weights_from_memory_and_from_the_per_item_loader(shapes, tmp_path):
    cfg = config(shapes, tmp_path, batch_size=8, lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3, lr=0.05)
    data = build_datasets(cfg, progress=False)
    loaders = build_loaders(cfg, data)
    loaders.set_epoch(0)
    results = []
    for loader in (loaders.train, _per_item_batches(shapes, cfg, 0)):
        trainer = build_trainer(cfg, data.num_classes, data.input_size, CPU)
        torch.manual_seed(0)
        entry = train_one_epoch(trainer, loader, 0)
        results.append((entry, {k: v.clone() for k, v in trainer.net.state_dict().items()}))
        # the epoch's hooks are gone with its `with` block
        assert all(not m._forward_hooks for m in trainer.net.modules())
    (ea, wa), (eb, wb) = results
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {k: v for k, v in ea.items() if k != "train_time"} == {k: v for k, v in eb.items() if k != "train_time"}
    start = build_trainer(cfg, data.num_classes, data.input_size, CPU).net.state_dict()
    assert not torch.equal(start["conv1.weight"], wa["conv1.weight"])  # it trained


def test_step_metrics_sum_without_leaving_the_device(shapes, tmp_path):
    cfg = config(shapes, tmp_path, lambda_bn=1e-2, monitor=False)
    trainer = build_trainer(cfg, num_classes=2, input_size=32, device=CPU)
    x, y = batch(shapes, 6)
    a, b = train_step(trainer, x, y, None), train_step(trainer, x, y, None)
    both = a + b
    assert both.count.dtype == torch.int64 and both.count.item() == 12
    assert both.correct.item() == a.correct.item() + b.correct.item()
    assert both.terms["r_bn"].dtype == torch.float64
    assert both.terms["r_bn"].item() == a.terms["r_bn"].item() + b.terms["r_bn"].item()
    assert math.isnan(both.terms["l_g"]) and set(both.terms) == set(TERM_NAMES)
    zero = StepMetrics.zeros(CPU) + a
    assert all(torch.equal(zero.terms[k], a.terms[k]) or math.isnan(a.terms[k]) for k in TERM_NAMES)


def test_image_folder_root(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("beach", "forest"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                img = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / split / cls / f"{i}.png")
    cfg = TrainConfig(data=str(tmp_path), input_size=32)
    data = build_datasets(cfg, progress=False)
    assert (data.num_classes, data.class_names, data.input_size) == (2, ["beach", "forest"], 32)
    assert data.normalization == IMAGENET_NORMALIZATION
    x, y = data.val[3]
    assert x.shape == (3, 32, 32) and y == 1
    assert data.train[0][0].shape == (3, 32, 32)
    (tmp_path / "val" / "forest" / "0.png").unlink()
    (tmp_path / "val" / "forest" / "1.png").unlink()
    (tmp_path / "val" / "forest").rmdir()
    with pytest.raises(InputError, match="different class folders"):
        build_datasets(cfg, progress=False)
    with pytest.raises(InputError, match="ImageFolder root"):
        build_datasets(TrainConfig(data=str(tmp_path / "train" / "beach")), progress=False)


def test_batches_and_augmentations_do_not_depend_on_the_worker_count(tmp_path):
    root = image_folder(tmp_path / "imgs", classes=2, per_class=3)
    data = build_datasets(TrainConfig(data=str(root), input_size=16), progress=False)

    def batches(workers: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = TrainConfig(data=str(root), input_size=16, batch_size=2, workers=workers, seed=9)
        loaders = build_loaders(cfg, data)
        loaders.set_epoch(epoch)
        return list(loaders.train)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    serial = batches(0, 1)
    # loading in the main process leaves the global stream (dropout) untouched
    assert torch.equal(torch.get_rng_state(), before)
    parallel = batches(2, 1)
    assert len(serial) == len(parallel) == 3
    for (xa, ya), (xb, yb) in zip(serial, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the crops really are random, and a function of the epoch: another epoch gives other images
    other = batches(0, 2)
    sums_a = sorted(float(x.sum()) for xb, _ in serial for x in xb)
    sums_b = sorted(float(x.sum()) for xb, _ in other for x in xb)
    assert sums_a != sums_b


def test_alexnet_b_training_uses_the_bn_form_of_psi_and_logs_the_gamma_aware_relevance(tmp_path):
    root = image_folder(tmp_path / "imgs", classes=3, per_class=2, size=(70, 70))
    layer, bn_name = "features.4", "features.5"  # AlexNet's conv2 (192 filters) and its BN
    cfg = TrainConfig(data=str(root), arch="alexnet_b", input_size=63, out=str(tmp_path / "run"), groups=4,
                      layers=[layer], lambda_g=1.0, lambda_s=1.0, monitor=False, batch_size=4, epochs=1,
                      max_train_batches=1, max_val_batches=1, workers=0, quiet=True, seed=2)
    result = train(cfg)
    entry = result.history[0]

    # the run's first (only) step, rebuilt: same seeded init, same first batch, same pair generator
    data = build_datasets(cfg, progress=False)
    trainer = build_trainer(cfg, data.num_classes, data.input_size, CPU)
    loaders = build_loaders(cfg, data)
    loaders.set_epoch(0)
    x, _ = next(iter(loaders.train))
    pair_state = trainer.objective.generator.get_state()  # the run's pairs for its first step
    pairs = sample_pairs(trainer.layer_groups[0].spec, torch.Generator().set_state(pair_state), 3)  # (4, 144, 2)
    net = trainer.net

    def manual_terms(gamma_divide: bool) -> tuple[float, float]:
        maps = {}
        hooks = [net.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: maps.__setitem__(n, o.detach())) for n in (layer, bn_name)]
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        if gamma_divide:  # eq. 4: tau = BN output / gamma
            gamma = net.get_submodule(bn_name).weight.detach()
            psi = torch.sigmoid(maps[bn_name] / gamma.view(1, -1, 1, 1))
        else:  # eq. 1, the no-BN form: conv output / its minibatch std
            pre = maps[layer]
            psi = torch.sigmoid(pre / (pre.std(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5))
        l_g = 0.0
        for g in range(pairs.shape[0]):
            d = []
            for i, j in pairs[g].tolist():
                p, q = psi[:, i], psi[:, j]
                diff = (p - q).abs().sum()
                d.append(float(2 * diff / (p.sum() + q.sum() + diff)))
            l_g += sum(d) / len(d)
        n, c, h, w = psi.shape
        rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
        cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
        mass = psi.sum(dim=(2, 3))  # (N, C)
        cr = (psi * rows).sum(dim=(2, 3)) / mass
        cc = (psi * cols).sum(dim=(2, 3)) / mass
        dist = torch.sqrt((rows - cr[..., None, None]) ** 2 + (cols - cc[..., None, None]) ** 2)
        l_s = float(((psi * dist).sum(dim=(2, 3)) / mass).mean())
        return l_g, l_s

    l_g, l_s = manual_terms(True)
    assert entry["l_g"] == pytest.approx(l_g, rel=1e-4)
    assert entry["l_s"] == pytest.approx(l_s, rel=1e-4)
    l_g_std, l_s_std = manual_terms(False)
    assert abs(l_s_std - l_s) > 1e-2 * l_s and abs(l_g_std - l_g) > 1e-2 * l_g  # the check discriminates

    # with gamma != 1 and beta != 0 the objective's terms still follow tau = BN output / gamma
    bn = net.get_submodule(bn_name)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.3, 3.0, 192) * torch.where(torch.arange(192) % 7 == 0, -1.0, 1.0))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 192))
    l_g, l_s = manual_terms(True)
    assert torch.equal(trainer.objective.generator.get_state(), pair_state)  # unused so far: same pairs
    with torch.no_grad(), GroupActivations(net, trainer.layer_groups) as acts:
        net(x)
        terms = trainer.objective(acts.captured)  # what train_step adds to the task loss
    assert float(terms["l_g"]) == pytest.approx(l_g, rel=1e-4)
    assert float(terms["l_s"]) == pytest.approx(l_s, rel=1e-4)
    assert float(terms["total"]) == pytest.approx(l_g + l_s, rel=1e-4)

    # the log entry carries beta_bn = |w_i |gamma_i| / sqrt(running_var_i + eps)|_F per group
    ckpt = load_checkpoint(result.latest)
    sd = ckpt["state_dict"]
    w, gamma, var = sd[f"{layer}.weight"], sd[f"{bn_name}.weight"], sd[f"{bn_name}.running_var"]
    naive = []
    for g in range(4):
        total = 0.0
        for i in range(g * 48, (g + 1) * 48):
            total += float((w[i] * abs(float(gamma[i])) / math.sqrt(float(var[i]) + 1e-5)).pow(2).sum())
        naive.append(math.sqrt(total))
    logged = read_log(tmp_path / "run" / "log.jsonl")[1][0]["relevance"][layer]
    assert logged["beta_bn"] == pytest.approx(naive, rel=1e-5)
    assert entry["relevance"][layer]["beta_bn"] == logged["beta_bn"]
    assert logged["beta"] != pytest.approx(naive, rel=1e-2)  # differs from the plain relevance


def test_epoch_line_formats_the_metrics_and_leaves_out_top5_below_5_classes():
    from cgl_train.engine import epoch_line, val_text

    entry = {"epoch": 3, "task": 0.412, "total": 0.4125, "train_top1": 0.48, "val_top1": 0.514, "val_top5": None,
             "val_loss": 0.93, "time": 12.34}
    assert epoch_line(entry, 12) == ("epoch 3/12  train loss 0.412 (task 0.412)  train top-1 48.0 %  "
                                     "val top-1 51.4 %  val loss 0.930  (12.3 s)")
    entry.update(total=0.412, val_top5=0.9)
    assert epoch_line(entry, 12) == ("epoch 3/12  train loss 0.412  train top-1 48.0 %  val top-1 51.4 %  "
                                     "top-5 90.0 %  val loss 0.930  (12.3 s)")
    skipped = {**entry, "val_top1": None, "val_top5": None, "val_loss": None}  # an epoch without validation
    assert "val" not in epoch_line(skipped, 12) and "None" not in epoch_line(skipped, 12)
    assert val_text(skipped) == "no validation"


def test_cli_logs_one_formatted_line_per_epoch_and_no_top5_for_two_classes(shapes, tmp_path, capsys, caplog):
    import logging

    out = tmp_path / "lines"
    with caplog.at_level(logging.INFO, logger="cgl_train.engine"):
        code = main(["--data", "synthetic", "--synthetic-dir", str(shapes), "--synthetic-per-class", "1",
                     "--synthetic-size", "32", "--arch-kwargs", '{"width1": 8, "width2": 16}', "--out", str(out),
                     "--epochs", "2", "--batch-size", "12", "--workers", "0", "--quiet"])
    assert code == 0
    entries = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()][1:]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2
    for line, e in zip(lines, entries):
        assert line.startswith(f"epoch {e['epoch']}/2  train loss {e['total']:.3f}")
        assert f"val top-1 {100 * e['val_top1']:.1f} %" in line and "top-5" not in line and "None" not in line
        assert e["val_top5"] is None  # log.jsonl keeps its field (docs/contracts.md)
    printed = capsys.readouterr().out
    assert f"val top-1 {100 * entries[-1]['val_top1']:.1f} %" in printed and "top-5" not in printed


# ---------------------------------------------------------------- --data DIR of a `dissect synth` set

def test_data_dir_of_a_synthetic_set_trains_as_its_synthetic_equivalent(shapes, tmp_path, capsys):
    common = ["--arch-kwargs", '{"width1": 8, "width2": 16}', "--epochs", "1", "--batch-size", "12",
              "--workers", "0", "--quiet"]
    direct, equivalent = tmp_path / "direct", tmp_path / "equivalent"
    assert main(["--data", str(shapes), "--out", str(direct), *common]) == 0  # no --synthetic-* flags needed
    assert main(["--data", "synthetic", "--synthetic-dir", str(shapes), "--synthetic-per-class", "1",
                 "--synthetic-size", "32", "--out", str(equivalent), *common]) == 0
    recorded = json.loads((direct / "config.json").read_text())
    # recorded as the set it is: synthetic, in that directory, with the set's own parameters
    assert recorded["data"] == "synthetic" and recorded["synthetic_dir"] == str(shapes.resolve())
    assert (recorded["synthetic_per_class"], recorded["synthetic_size"]) == (1, 32)
    a, b = load_checkpoint(direct / "latest.pth"), load_checkpoint(equivalent / "latest.pth")
    assert a["input_size"] == 32 and a["train_options"]["data"] == "synthetic"
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])  # the same training


def test_data_dir_errors_name_the_accepted_layouts(shapes, tmp_path, capsys):
    with pytest.raises(InputError, match=r"--synthetic-size 48: .* generated with size 32"):
        build_datasets(TrainConfig(data=str(shapes), synthetic_size=48), progress=False)
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(InputError) as err:
            build_datasets(TrainConfig(data=str(data)), progress=False)
        text = str(err.value)
        assert str(data) in text and "ImageFolder root" in text and "dissect synth" in text and "'synthetic'" in text
    assert main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "neither an ImageFolder root" in err and "dissect synth" in err
