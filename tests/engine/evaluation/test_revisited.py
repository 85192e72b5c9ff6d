"""engine.evaluation.revisited's alignment of a ground truth with features files' names (the
scores themselves are tested in test_metrics.py)."""

from __future__ import annotations

import pytest

from engine.errors import InvalidInputError
from engine.evaluation.revisited import align_revisitop_gnd

DATA = {
    "imlist": ["a", "b", "c", "d"],
    "qimlist": ["q0", "q1"],
    "gnd": [{"easy": [0], "hard": [1, 2], "junk": [3], "bbx": [0, 0, 1, 1]},
            {"easy": [3], "hard": [], "junk": [0]}],
}


def test_align_maps_indices_and_queries_by_name():
    gnd = align_revisitop_gnd(DATA, ["d", "c", "a", "b"], ["q1", "q0"])
    # a, b, c, d sit at rows 2, 3, 1, 0; q0 is the second query, q1 the first
    assert gnd == [{"easy": [0], "hard": [], "junk": [2]},
                   {"easy": [2], "hard": [3, 1], "junk": [0]}]


def test_align_in_the_ground_truths_order_is_the_identity():
    gnd = align_revisitop_gnd(DATA, DATA["imlist"], DATA["qimlist"])
    assert gnd == [{key: entry[key] for key in ("easy", "hard", "junk")} for entry in DATA["gnd"]]


def test_align_names_missing_and_extra_items():
    with pytest.raises(InvalidInputError, match=r"1 item missing from the gallery: 'c'.*"
                       r"1 item in the gallery but not in the ground truth's 'imlist': 'x'"):
        align_revisitop_gnd(DATA, ["a", "b", "x", "d"], ["q0", "q1"])
    with pytest.raises(InvalidInputError, match=r"queries.*'qimlist'.*missing from the "
                       r"queries: 'q1'"):
        align_revisitop_gnd(DATA, DATA["imlist"], ["q0"])


def test_align_lists_only_the_first_missing_names():
    data = {"imlist": [f"im{i}" for i in range(12)], "qimlist": [], "gnd": []}
    with pytest.raises(InvalidInputError, match=r"12 items missing from the gallery: 'im0', "
                       r"'im1', 'im2', 'im3', 'im4' and 7 more"):
        align_revisitop_gnd(data, [], [])
