"""Resume after a kill equals an uninterrupted run; a killed run never looks complete."""
from __future__ import annotations

import json

import pytest
import torch

from dissect.results import LABEL_STRIP_FILE, LAYER_FILES
from dissect.runner import dissect_model
from dissect.state import STATE_DIRNAME
from test_pipeline import LAYERS, ConceptNet, config, make_concept_broden

FILES = (*LAYER_FILES, LABEL_STRIP_FILE)


class Killed(RuntimeError):
    pass


def kill_after(model, calls: int):
    """A forward hook that raises on the given forward call (simulates a kill mid-stage)."""
    seen = {"n": 0}

    def hook(module, inputs, output):
        seen["n"] += 1
        if seen["n"] == calls:
            raise Killed(f"killed at forward {calls}")
    return model.units.register_forward_hook(hook)


def summary_without_timings(path):
    d = json.loads((path / "summary.json").read_text())
    d.pop("timings")
    for k in ("save_every", "save_interval_s"):  # bookkeeping only
        d["options"].pop(k)
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_concept_broden(tmp_path_factory.mktemp("resume") / "broden", n=10)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    dissect_model(ConceptNet().eval(), root, LAYERS, config(batch_size=2, keep_activations="no"), out=out)
    return out


# 10 images in batches of 2: 5 forwards in stage 1, then 5 in stage 2 and 5 in stage 3 (label strips),
# activations recomputed. The first call is layer_shapes' probe forward: data forwards are calls 2..16.
@pytest.mark.parametrize("kill_at", [4, 9, 14])
def test_resumed_equals_uninterrupted(root, reference, tmp_path, kill_at):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "summary.json").write_text('{"format": "dissect-results", "stale": true}')
    model = ConceptNet().eval()
    handle = kill_after(model, kill_at)
    cfg = config(batch_size=2, keep_activations="no", save_every=1, save_interval_s=0)
    with pytest.raises(Killed):
        dissect_model(model, root, LAYERS, cfg, out=out)
    handle.remove()
    assert not (out / "summary.json").exists()  # the old summary went before any work
    states = list((out / STATE_DIRNAME).rglob("stage*.pt"))
    assert states, "a killed run leaves its state behind"
    # killed in the third batch of a stage: its state says the next batch starts at image 4
    stage = "stage3" if kill_at > 11 else "stage2" if kill_at > 6 else "stage1"
    saved = {p.stem: torch.load(p, weights_only=True) for p in states}
    assert saved[stage]["next"] == 4
    if stage != "stage1":
        assert saved["stage1"]["next"] == 10

    calls = {"n": 0}
    counter = model.units.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    dissect_model(model, root, LAYERS, cfg, out=out)
    counter.remove()
    # resumed: fewer forwards than a full run (1 probe + 5 + 5 + 5)
    assert calls["n"] < 16
    for name in LAYERS:
        for f in FILES:
            assert (out / name / f).read_bytes() == (reference / name / f).read_bytes(), (name, f)
    assert summary_without_timings(out) == summary_without_timings(reference)
    assert not (out / STATE_DIRNAME).exists()  # state cleared once the results are written


def test_changed_options_do_not_reuse_state(root, reference, tmp_path):
    out = tmp_path / "out"
    model = ConceptNet().eval()
    handle = kill_after(model, 5)
    with pytest.raises(Killed):
        dissect_model(model, root, LAYERS, config(batch_size=2, save_every=1, save_interval_s=0, top_fraction=0.3),
                      out=out)
    handle.remove()
    # a different quantile is a different run: the saved state must not leak into it
    dissect_model(model, root, LAYERS, config(batch_size=2, keep_activations="no"), out=out)
    for name in LAYERS:
        for f in FILES:
            assert (out / name / f).read_bytes() == (reference / name / f).read_bytes(), (name, f)


def test_quick_stages_are_not_saved(root, tmp_path):
    # default save_interval_s (60 s): a run this short never pays for writing its state
    out = tmp_path / "out"
    model = ConceptNet().eval()
    handle = kill_after(model, 9)
    with pytest.raises(Killed):
        dissect_model(model, root, LAYERS, config(batch_size=2, keep_activations="no", save_every=1),
                      out=out)
    handle.remove()
    assert not list(out.rglob("stage*.pt"))


def test_disabled_state_names_no_path():
    from dissect.state import RunState

    state = RunState(None, "key")
    assert not state.enabled and state.load("stage1") is None
    state.save("stage1", {"next": 1})  # a no-op, not an error
    with pytest.raises(RuntimeError, match="no output directory"):
        state._path("stage1")  # an explicit error, also under python -O
