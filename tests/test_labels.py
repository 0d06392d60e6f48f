"""Labels, ties, detector rules and the unique-detector definitions on hand-made IoU matrices."""
from __future__ import annotations

import numpy as np
import pytest

from dissect.labels import label_units, layer_label_summary, unique_detectors

CATS = ["color", "object", "scene"]
# global ids: 1, 2 color; 3, 4 object; 6 scene; 5 unused (-1)
LABEL_CAT = np.array([-1, 0, 0, 1, 1, -1, 2])


def iou_matrix(rows):
    return np.array(rows, dtype=np.float64)


def test_ties_follow_the_reference():
    iou = iou_matrix([
        #  0    1     2     3     4    5    6
        [0.0, 0.10, 0.10, 0.02, 0.00, 0.9, 0.0],   # tie in color -> smaller id 1; id 5 unused is ignored
        [0.0, 0.05, 0.00, 0.05, 0.00, 0.0, 0.0],   # color and object tie -> later category (object)
        [0.0, 0.00, 0.00, 0.00, 0.00, 0.0, 0.0],   # nothing: label 0, the last category
        [0.0, 0.00, 0.03, 0.00, 0.07, 0.0, 0.2],   # scene wins
    ])
    lab = label_units(iou, LABEL_CAT, CATS)
    assert lab.cat_labels.tolist() == [[1, 1, 0, 2], [3, 3, 0, 4], [0, 0, 0, 6]]
    assert lab.top_label.tolist() == [1, 3, 0, 6]
    assert lab.top_category.tolist() == [0, 1, 2, 2]
    np.testing.assert_allclose(lab.top_score, [0.10, 0.05, 0.0, 0.2])


@pytest.mark.parametrize("rule,expected", [(">=", [True, True, False]), (">", [True, False, False])])
def test_detector_rule_at_the_threshold(rule, expected):
    iou = iou_matrix([[0, 0.5, 0, 0, 0, 0, 0], [0, 0.04, 0, 0, 0, 0, 0], [0, 0.039, 0, 0, 0, 0, 0]])
    lab = label_units(iou, LABEL_CAT, CATS, iou_threshold=0.04, detector_rule=rule)
    assert lab.detector.tolist() == expected


def test_unique_detector_definitions_differ_as_documented():
    iou = iou_matrix([
        [0, 0.30, 0, 0.20, 0, 0, 0],   # top red; also an object detector (paper counts it in object too)
        [0, 0.25, 0, 0.00, 0, 0, 0],   # red again: not unique
        [0, 0.00, 0, 0.00, 0.04, 0, 0],  # exactly 0.04: a top-label detector (>=), not a paper one (>)
        [0, 0.00, 0.05, 0.0, 0, 0, 0.01],  # green
    ])
    lab = label_units(iou, LABEL_CAT, CATS, 0.04, ">=")
    u = unique_detectors(lab, 0.04, ">=", ">")
    assert u["paper"]["per_category"] == {"color": 2, "object": 1, "scene": 0}
    assert u["paper"]["total"] == 3
    assert u["top_label"]["per_category"] == {"color": 2, "object": 1, "scene": 0}
    assert u["top_label"]["total"] == 3
    # distinguish: with '>' for top-label detectors unit 2 drops out
    lab_strict = label_units(iou, LABEL_CAT, CATS, 0.04, ">")
    assert unique_detectors(lab_strict, 0.04, ">", ">")["top_label"]["per_category"]["object"] == 0
    # the paper count includes unit 0's object label 3 although its top label is red
    lab2 = label_units(iou[[0, 1, 3]], LABEL_CAT, CATS)
    u2 = unique_detectors(lab2, 0.04, ">=", ">")
    assert u2["paper"]["per_category"]["object"] == 1 and u2["top_label"]["per_category"]["object"] == 0

    s = layer_label_summary(lab, 0.04, ">=", ">")
    assert s["detectors"] == 4
    assert s["detectors_per_category"] == {"color": 3, "object": 1, "scene": 0}
    assert s["rud"] == {"paper": 3 / 4, "top_label": 3 / 4}


def test_random_matrix_matches_naive_loops():
    rng = np.random.default_rng(3)
    iou = rng.random((20, 7)) * 0.1
    iou[rng.random((20, 7)) < 0.3] = 0
    lab = label_units(iou, LABEL_CAT, CATS, 0.04, ">=")
    for u in range(20):
        best = []
        for c in range(3):
            ids = [l for l in range(7) if LABEL_CAT[l] == c]
            top = max(iou[u, l] for l in ids)
            best.append((top, [l for l in ids if iou[u, l] == top][0] if top > 0 else 0))
        c_top = max(c for c in range(3) if best[c][0] == max(b[0] for b in best))
        assert lab.top_label[u] == best[c_top][1]
        assert lab.detector[u] == (best[c_top][0] >= 0.04 and best[c_top][1] > 0)
