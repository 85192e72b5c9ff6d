"""Every registered method says in one line what its distances mean (the page shows it)."""

from __future__ import annotations

import pytest

from engine.explorer import distance_note
from engine.rerank import get_reranker_class, list_rerankers
from engine.rerank.base import Reranker


@pytest.mark.parametrize("method", list_rerankers())
def test_every_method_has_a_distance_note(method: str) -> None:
    note = get_reranker_class(method).distance_note
    assert note.strip() and "\n" not in note
    assert note != Reranker.distance_note  # set by the method, not the base's empty default
    assert distance_note(method) == note
