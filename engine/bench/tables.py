"""Markdown tables for the benchmarks' output (readable in a terminal, pasteable into the
README)."""

from __future__ import annotations

from collections.abc import Sequence


def cell(value: float | None, pattern: str) -> str:
    """A table cell: the number in `pattern`, or "-" where there is none."""
    return "-" if value is None else format(value, pattern)



def markdown_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A titled Markdown table (readable in a terminal and pasteable into the README)."""
    lines = [title, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
