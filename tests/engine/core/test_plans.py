"""Plans: the sentence a page shows before long work, totals and what counts as long."""

from __future__ import annotations

from engine.core.plans import LONG_JOB_SECONDS, Plan, PlanStep, duration_text


def test_a_plan_reads_as_one_sentence_with_its_estimates() -> None:
    plan = Plan([PlanStep("indexes the 1,360 images of flowers with tf_efficientnet_lite2", 170),
                 PlanStep("trains the SSP query model", 300)])
    assert plan.text() == ("indexes the 1,360 images of flowers with tf_efficientnet_lite2, "
                           "about 3 min; then trains the SSP query model, about 5 min")
    assert plan.seconds == 470 and plan.long and plan


def test_an_unknown_step_makes_the_total_unknown_and_the_plan_long() -> None:
    plan = Plan.of(PlanStep("indexes 3 images", 2.0), None, PlanStep("trains SSR", None))
    assert len(plan.steps) == 2 and plan.seconds is None and plan.long
    assert plan.text() == "indexes 3 images, about 2 s; then trains SSR"


def test_an_empty_plan_is_instant() -> None:
    plan = Plan()
    assert not plan and plan.seconds == 0 and not plan.long and plan.text() == ""
    short = Plan([PlanStep("indexes 3 images", LONG_JOB_SECONDS - 1)])
    assert not short.long and short.then(Plan([PlanStep("x", 2.0)])).long


def test_durations_are_rough() -> None:
    assert [duration_text(s) for s in (0.2, 40, 170, 7200)] == ["1 s", "40 s", "3 min",
                                                                 "2.0 h"]
