"""docs/notebook_example.py runs as a plain script and writes what it says (a tested example)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "notebook_example.py"


def test_the_script_is_in_percent_cell_format() -> None:
    text = SCRIPT.read_text()
    assert text.count("\n# %%") >= 6 and "format_name: percent" in text


def test_the_example_runs_and_writes_a_unit_view_with_its_strip(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    env = {**os.environ, "DISSECT_EXAMPLE_OUT": str(out), "DISSECT_EXAMPLE_PER_CLASS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert f"<Dissection out='{out / 'results'}': conv1 (8 units" in stdout and "conv2 (16 units" in stdout
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["dataset"]["num_images"] == 45 and [l["name"] for l in summary["layers"]] == ["conv1", "conv2"]
    assert re.search(r"^conv1\s+8\s", stdout, re.M) and re.search(r"^conv2\s+16\s", stdout, re.M)  # r.summary
    # the unit the script chose (highest IoU) and its units.json entry
    m = re.search(r"<UnitView (conv\d) unit (\d+): '([^']*)' \(([^)]*)\)", stdout)
    assert m, stdout
    layer, unit, label, category = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    units = {layer: json.loads((out / "results" / layer / "units.json").read_text())["units"]
             for layer in ("conv1", "conv2")}
    entry = units[layer][unit]
    assert entry["iou"] == max(u["iou"] for us in units.values() for u in us)
    assert (entry["label"], entry["category"]) == (label, category)
    page = (out / "unit.html").read_text()
    assert f"<h4>{layer} unit {unit}</h4>" in page and f"<td>{label} ({category})</td>" in page
    images = re.findall(r"<img src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)'", page)
    assert images
    strip = Image.open(io.BytesIO(base64.b64decode(images[0])))
    k = len(entry["top_images"])
    assert k == 4 and strip.size == (k * 112 + 2 * (k - 1), 112)  # 32 px square images: 112 px tiles, 2 px gaps
    if entry.get("label_top_images"):  # the second strip, when the results carry it
        assert f"ranked by intersection with {label}" in page and len(images) == 2
