"""Evaluation protocols: which items are queries, which are the gallery, how many positives.

Kept in code so that the benchmark, the tests and the page all measure the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidInputError, UnknownNameError


@dataclass(frozen=True)
class Split:
    """Queries and gallery of one protocol over a labelled collection.

    query_rows / gallery_rows: rows of the collection, or query_rows = None for leave-one-out
    (every gallery item a query against the rest). n_positives: relevant items per query.
    training_rows: rows a learning method may learn from, disjoint from the queries and the
    gallery (None: the protocol holds nothing out; learners see only the gallery).
    """

    name: str
    query_rows: np.ndarray | None
    gallery_rows: np.ndarray
    n_positives: np.ndarray
    training_rows: np.ndarray | None = None

    @property
    def leave_one_out(self) -> bool:
        return self.query_rows is None

    @property
    def n_queries(self) -> int:
        return len(self.gallery_rows) if self.query_rows is None else len(self.query_rows)

    def query_labels(self, labels: np.ndarray) -> np.ndarray:
        return labels[self.gallery_rows if self.query_rows is None else self.query_rows]


def _require_labels(labels: np.ndarray | None, name: str) -> np.ndarray:
    if labels is None or (np.asarray(labels) < 0).all():
        raise InvalidInputError(f"protocol {name!r} needs a labelled collection")
    return np.asarray(labels)


def leave_one_out(labels: np.ndarray) -> Split:
    """Every item a query against the other items; positives = its class minus itself."""
    labels = _require_labels(labels, "leave-one-out")
    counts = np.bincount(labels[labels >= 0], minlength=labels.max() + 1)
    positives = np.where(labels >= 0, counts[np.maximum(labels, 0)] - 1, 0)
    return Split("leave-one-out", None, np.arange(len(labels)), positives)


def every_tenth_split(labels: np.ndarray) -> Split:
    """oxford17-split: queries are rows 0, 10, 20, ... (image_0001, image_0011, ...), the gallery
    is every other row; positives = gallery items of the query's class (72 for Oxford-17)."""
    labels = _require_labels(labels, "oxford17-split")
    rows = np.arange(len(labels))
    queries, gallery = rows[::10], np.setdiff1d(rows, rows[::10])
    positives = (labels[gallery][None, :] == labels[queries][:, None]).sum(axis=1)
    return Split("oxford17-split", queries, gallery, positives)


HELDOUT_TRAINING_CLASSES = 9


def heldout_classes_split(labels: np.ndarray,
                          training_classes: int = HELDOUT_TRAINING_CLASSES) -> Split:
    """oxford17-heldout: learners may use classes 0..8 (720 images; labels allowed for SSR, never
    for SSP); judged on classes 9..16 only, where every 10th image (in file order) of those
    classes is a query (64) and the rest of those classes the gallery (576)."""
    labels = _require_labels(labels, "oxford17-heldout")
    rows = np.arange(len(labels))
    training = rows[(labels >= 0) & (labels < training_classes)]
    judged = rows[labels >= training_classes]
    if len(training) == 0 or len(np.unique(labels[judged])) < 2:
        raise InvalidInputError(
            f"protocol 'oxford17-heldout' needs classes 0..{training_classes - 1} to learn from "
            f"and at least two classes above them to judge on")
    queries, gallery = judged[::10], np.setdiff1d(judged, judged[::10])
    positives = (labels[gallery][None, :] == labels[queries][:, None]).sum(axis=1)
    return Split("oxford17-heldout", queries, gallery, positives, training_rows=training)


PROTOCOLS: dict[str, Callable[[np.ndarray], Split]] = {
    "leave-one-out": leave_one_out,
    "oxford17-split": every_tenth_split,
    "oxford17-heldout": heldout_classes_split,
}


def make_split(name: str, labels: np.ndarray) -> Split:
    """The split of a registered protocol for a collection's labels (in file order)."""
    try:
        return PROTOCOLS[name](labels)
    except KeyError:
        raise UnknownNameError(
            f"no protocol {name!r}; available: {', '.join(PROTOCOLS)}") from None
