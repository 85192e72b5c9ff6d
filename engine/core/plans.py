"""What a long piece of work will do and roughly how long it will take, said before it starts.

The page asks before it starts work a user will wait on (indexing a new folder, building a
query model): a `Plan` of `PlanStep`s, each with a title and an estimate measured on this
machine (never a constant), reads as one sentence ("indexes the 1,360 images of flowers with
tf_efficientnet_lite2, about 3 min; then trains the SSP query model, about 5 min"). An empty
plan means the work is instant (everything is cached).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LONG_JOB_SECONDS = 15.0
"""Work estimated to take longer than this is "long": the page says so before starting it."""


@dataclass(frozen=True)
class PlanStep:
    """One step of a plan: what it does (a verb phrase: "indexes the 60 images of flowers with
    tf_efficientnet_lite0") and its estimated seconds (None when it cannot be estimated)."""

    title: str
    seconds: float | None


@dataclass(frozen=True)
class Plan:
    """The steps of a piece of work, in the order they run."""

    steps: tuple[PlanStep, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))

    @classmethod
    def of(cls, *steps: PlanStep | None) -> Plan:
        """A plan of the given steps, leaving out the None ones (steps with nothing to do)."""
        return cls(tuple(step for step in steps if step is not None))

    def then(self, other: Plan | Iterable[PlanStep]) -> Plan:
        """This plan followed by `other`'s steps."""
        steps = other.steps if isinstance(other, Plan) else tuple(other)
        return Plan(self.steps + steps)

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def seconds(self) -> float | None:
        """The total estimate (0 for an empty plan), None when a step has no estimate."""
        if any(step.seconds is None for step in self.steps):
            return None
        return float(sum(step.seconds for step in self.steps))  # type: ignore[misc]

    @property
    def long(self) -> bool:
        """Worth saying before it starts: above `LONG_JOB_SECONDS`, or of unknown length."""
        total = self.seconds
        return bool(self.steps) and (total is None or total > LONG_JOB_SECONDS)

    def text(self) -> str:
        """One sentence: each step with its estimate, joined by "; then " ("" when empty)."""
        return "; then ".join(
            step.title if step.seconds is None
            else f"{step.title}, about {duration_text(step.seconds)}" for step in self.steps)


def duration_text(seconds: float) -> str:
    """A rough duration: "40 s" under 90 s, "3 min" under 90 min, else "1.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
