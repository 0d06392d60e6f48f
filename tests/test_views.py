"""dissect.views: the object dissect.load / dissect.run return (tables, unit views with embedded strips)."""
from __future__ import annotations

import base64
import io
import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import dissect
from broden.errors import InputError
from broden_fixtures import make_tiny_broden
from dissect.results import load_results
from dissect.views import THUMB_HEIGHT, Dissection, UnitView
from results_fixture import make_results_dir

_IMG = re.compile(r"<img src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)'")


def _images(html_text: str) -> list[Image.Image]:
    """The embedded images of an HTML fragment, decoded."""
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in _IMG.findall(html_text)]


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    return make_results_dir(tmp_path, seed=2)


def test_load_returns_the_tables_of_load_results_and_a_short_repr(results: Path) -> None:
    r = dissect.load(results)
    assert isinstance(r, Dissection) and r.out == results and not r.reused
    assert dissect.Dissection is Dissection and dissect.UnitView is UnitView and "Dissection" in dir(dissect)
    frames = load_results(results)
    assert r.summary.equals(frames["summary"]) and r.units.equals(frames["units"])
    assert r.layers == ["conv1", "conv2"] and len(r.units) == 6 + 8
    assert r.options["iou_threshold"] == 0.04
    summary = json.loads((results / "summary.json").read_text())
    assert r.summary_json == summary
    text = repr(r)
    assert "\n" not in text and len(text) < 200 and "conv1 (6 units" in text and str(results) in text
    assert "array" not in text and "[" not in text
    assert "conv2" in str(r) and "<table" in r._repr_html_()


def test_unit_view_shows_labels_ious_and_the_report_strip(results: Path) -> None:
    from reports.results import read_run
    from reports.thumbnails import unit_strips

    r = dissect.load(results)
    units = json.loads((results / "conv2" / "units.json").read_text())["units"]
    entry = units[4]
    view = r.unit("conv2", 4)
    assert isinstance(view, UnitView) and view.label == entry["label"] and view.iou == entry["iou"]
    text = view._repr_html_()
    assert f"<td>{entry['label']} ({entry['category']})</td>" in text
    for cat, pc in entry["per_category"].items():
        assert f"<td>{cat}</td><td>{pc['label']}</td><td>{pc['iou']:.4f}</td>" in text
    assert f"{entry['threshold']:.6g}" in text
    [strip] = _images(text)
    k = len(entry["top_images"])  # 32 px images give square tiles, 2 px apart
    assert strip.size == (k * THUMB_HEIGHT + 2 * (k - 1), THUMB_HEIGHT)
    # the same pixels as the HTML report's strip of that unit (both JPEG at quality 85, 4:4:4)
    run = read_run(results)
    layer = next(lr for lr in run.layers if lr.name == "conv2")
    paths = unit_strips(layer, run.summary["dataset"]["root"], results / "report", top_k=k)
    with Image.open(results / "report" / paths[4]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(strip.convert("RGB")))
    short = repr(view)
    assert "\n" not in short and "conv2 unit 4" in short and entry["label"] in short


def test_mask_fields_and_the_label_ranked_strip_show_when_present(results: Path) -> None:
    path = results / "conv1" / "units.json"
    data = json.loads(path.read_text())
    unit = data["units"][1]
    unit["mask_components"], unit["mask_spread"] = 1.5, 0.25
    unit["label_top_images"] = unit["top_images"][:2]
    path.write_text(json.dumps(data))
    r = dissect.load(results)
    text = r.unit("conv1", 1)._repr_html_()
    assert "<th style='text-align:left'>mask components</th><td>1.500</td>" in text
    assert "mask spread</th><td>0.250</td>" in text
    assert "ranked by intersection" not in text and len(_images(text)) == 1  # no maps: skipped silently
    maps = np.load(results / "conv1" / "top_activations.npy")
    np.save(results / "conv1" / "label_top_activations.npy", maps[:, :2])
    text = r.unit("conv1", 1)._repr_html_()
    assert f"ranked by intersection with {unit['label']}" in text
    top, ranked = _images(text)
    assert ranked.size == (2 * THUMB_HEIGHT + 2, THUMB_HEIGHT) and top.size[0] > ranked.size[0]
    # the same first image and map: the first tile (112 px, whole 8 px JPEG blocks) decodes identically
    assert np.array_equal(np.asarray(ranked)[:, :THUMB_HEIGHT], np.asarray(top)[:, :THUMB_HEIGHT])


def test_unknown_layer_and_unit_out_of_range_name_what_is_valid(results: Path) -> None:
    r = dissect.load(results)
    with pytest.raises(InputError, match=r"no layer 'fc'.*conv1, conv2"):
        r.unit("fc", 0)
    with pytest.raises(InputError, match=r"unit 8 out of range for layer 'conv2'.*0\.\.7"):
        r.unit("conv2", 8)
    with pytest.raises(InputError, match=r"unit -1 out of range"):
        r.unit("conv2", -1)
    with pytest.raises(InputError, match="integer"):
        r.unit("conv2", "3")  # type: ignore[arg-type]


def test_missing_dataset_shows_the_table_and_says_why(results: Path, tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(tmp_path / "broden")
    text = dissect.load(results).unit("conv1", 0)._repr_html_()
    assert "<img" not in text and "<td>" in text
    assert "top images not shown" in text and "is not there" in text and str(tmp_path / "broden") in text


def test_missing_images_become_grey_tiles_and_are_counted(results: Path, tmp_path: Path) -> None:
    entry = json.loads((results / "conv1" / "units.json").read_text())["units"][0]
    (tmp_path / "broden" / "images" / entry["top_images"][0]["image"]).unlink()
    text = dissect.load(results).unit("conv1", 0)._repr_html_()
    [strip] = _images(text)
    assert f"1 of {len(entry['top_images'])} images could not be read" in text
    first_tile = np.asarray(strip)[:, :THUMB_HEIGHT].astype(int)
    assert np.abs(first_tile - 160).max() <= 3  # grey placeholder (JPEG noise aside)


class _Red(nn.Module):
    """One unit: the red channel of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def test_run_without_out_builds_the_tables_and_views_from_memory(tmp_path: Path) -> None:
    root = make_tiny_broden(tmp_path / "broden")
    net = nn.Sequential(OrderedDict(pool=nn.AvgPool2d(2), red=_Red()))
    r = dissect.run(net, root, None, layers=["red"], normalize="none", quiet=True, device="cpu",
                    decoded_cache="off", top_fraction=0.2, top_k=3)
    assert isinstance(r, Dissection) and r.out is None and r.result is not None
    assert r.layers == ["red"] and len(r.units) == 1 and r.summary.loc[0, "num_units"] == 1
    assert "in memory" in repr(r) and "array" not in repr(r)
    view = r.unit("red", 0)
    assert view.label == r.units.loc[0, "label"]
    [strip] = _images(view._repr_html_())
    assert strip.size[1] == THUMB_HEIGHT and len(view.top_images) == 3
    # written to a directory, the same run reads back the same tables
    again = dissect.run(net, root, tmp_path / "out", layers=["red"], normalize="none", quiet=True, device="cpu",
                        decoded_cache="off", top_fraction=0.2, top_k=3)
    assert again.units.equals(dissect.load(tmp_path / "out").units)
    assert again.units.drop(columns=["mask_components", "mask_spread"]).equals(
        r.units.drop(columns=["mask_components", "mask_spread"]))


def test_quiet_run_prints_no_progress_and_restores_the_switch(tmp_path: Path, capfd, monkeypatch) -> None:
    import broden._progress as progress_module

    monkeypatch.setattr(progress_module, "_QUIET", False)  # this test's own starting point
    root = make_tiny_broden(tmp_path / "broden")
    net = nn.Sequential(OrderedDict(pool=nn.AvgPool2d(2), red=_Red()))
    common = dict(layers=["red"], normalize="none", device="cpu", decoded_cache="off", top_fraction=0.2, top_k=3)
    dissect.run(net, root, None, quiet=True, **common)
    assert "stage" not in capfd.readouterr().err and progress_module._QUIET is False
    dissect.run(net, root, None, **common)
    assert "stage 1" in capfd.readouterr().err  # the same run, not quiet: its bars are shown
