# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Dissecting a network from Python
#
# `dissect.run` dissects a model and returns a result object; `dissect.load` reads the same
# object back from a results directory. This example runs in seconds on a CPU: it writes the
# CGL paper's synthetic shapes set (Broden format, a few images per class) and dissects an
# untrained tiny CNN. It opens in Jupyter as a notebook (`jupytext --to notebook`, or the
# jupytext extension) and runs as a plain script:
#
#     python docs/notebook_example.py [OUT_DIR]
#
# OUT_DIR (default: the `DISSECT_EXAMPLE_OUT` environment variable, else `example-out`) receives
# the dataset, the results and `unit.html`, the view of one unit as Jupyter shows it.
# `DISSECT_EXAMPLE_PER_CLASS` sets the images per class (default 2, 45 classes).

# %%
import os
import sys
from pathlib import Path

import torch

import dissect
from broden.synthetic import generate_shapes_dataset
from dissect.architectures import build_model

argv = [a for a in sys.argv[1:] if not a.startswith("-")]  # Jupyter passes its own -f flag
OUT = Path(argv[0] if argv else os.environ.get("DISSECT_EXAMPLE_OUT", "example-out"))
PER_CLASS = int(os.environ.get("DISSECT_EXAMPLE_PER_CLASS", "2"))

# %% [markdown]
# ## A tiny dataset and an untrained network
#
# 45 classes of two coloured shapes, with color / shape / color_shape label maps. The network is
# the paper's two-conv CNN, narrowed to 8 and 16 filters; untrained, so expect few detectors.

# %%
data = generate_shapes_dataset(OUT / "shapes", per_class=PER_CLASS, size=32, seed=0, progress=False)
torch.manual_seed(0)
model = build_model("tiny_cnn", num_classes=2, input_size=32, width1=8, width2=16)

# %% [markdown]
# ## Dissect
#
# Every `dissect run` option is a keyword. A second call with the same options reuses the
# finished results in `out`.

# %%
r = dissect.run(model, data, OUT / "results", layers=["conv1", "conv2"], normalize="imagenet", device="cpu",
                top_fraction=0.05, top_k=4, quiet=True)
print(repr(r))

# %% [markdown]
# ## Tables
#
# `r.summary` has a row per layer, `r.units` a row per unit (pandas DataFrames).

# %%
print(r.summary.to_string(index=False))

# %%
print(r.units.head().to_string(index=False))

# %% [markdown]
# ## One unit
#
# `r.unit(layer, u)` shows the unit's label, its IoUs per category and its top images with the
# thresholded activation mask drawn over them (a notebook renders it inline; here we save it).

# %%
best = r.units.sort_values("iou", ascending=False).iloc[0]
view = r.unit(str(best["layer"]), int(best["unit"]))
print(repr(view))
(OUT / "unit.html").write_text(view._repr_html_())
view

# %% [markdown]
# ## Later, from the directory

# %%
again = dissect.load(OUT / "results")
assert again.units.equals(r.units)
print(f"wrote {OUT / 'unit.html'}")
