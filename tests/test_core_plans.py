"""Guidance plans: constructors, strings, schedules and malformed input."""

from __future__ import annotations

import pytest

from cfgswitch import GuidancePlan, InvalidArgumentError, PlanParseError


@pytest.mark.parametrize(
    "text", ["always", "switch:0.5", "switch:0.5:cond", "step:20", "timestep:500", "interval:0.2:0.6", "adaptive:0.995",
             "interval:0.2:0.6:cond", "adaptive:0.995:cond", "step:0"],
)
def test_round_trip(text):
    plan = GuidancePlan.parse(text)
    assert str(plan) == text
    assert GuidancePlan.parse(str(plan)) == plan


def test_constructors_equal_parsed():
    assert GuidancePlan.parse("switch:0.5") == GuidancePlan.switch_at(0.5)
    assert GuidancePlan.parse("switch:0.5:cond") == GuidancePlan.switch_at(0.5, late="cond")
    assert GuidancePlan.parse("step:20") == GuidancePlan.switch_at_step(20)
    assert GuidancePlan.parse("timestep:500") == GuidancePlan.switch_at_timestep(500)
    assert GuidancePlan.parse("interval:0.2:0.6") == GuidancePlan.interval(0.2, 0.6)
    assert GuidancePlan.parse("adaptive:0.995") == GuidancePlan.adaptive(0.995)
    assert GuidancePlan.always().late == "uncond"


def test_schedules():
    ts = list(range(999, 0, -100))  # 10 steps
    assert GuidancePlan.always().schedule(ts) == [True] * 10
    assert GuidancePlan.switch_at(0.5).schedule(ts) == [True] * 5 + [False] * 5
    assert GuidancePlan.switch_at(0.0).schedule(ts) == [False] * 10
    assert GuidancePlan.switch_at(1.0).schedule(ts) == [True] * 10
    assert GuidancePlan.switch_at_step(3).schedule(ts) == [True] * 3 + [False] * 7
    assert GuidancePlan.switch_at_step(50).schedule(ts) == [True] * 10
    # timesteps 999, 899, ..., 99: CFG while t > 500
    assert GuidancePlan.switch_at_timestep(500).schedule(ts) == [True] * 5 + [False] * 5
    assert GuidancePlan.interval(0.2, 0.6).schedule(ts) == [False] * 2 + [True] * 4 + [False] * 4
    # switch:0.5 of 30 steps switches at 15; of 7 steps rounds half up to 4
    assert GuidancePlan.switch_at(0.5).schedule(range(30)).index(False) == 15
    assert GuidancePlan.switch_at(0.5).schedule(range(7)).index(False) == 4


def test_adaptive_switch_rule():
    plan = GuidancePlan.adaptive(0.99)
    assert plan.is_adaptive and plan.schedule([3, 2, 1]) == [True] * 3
    assert not plan.should_switch(0.98)
    assert plan.should_switch(0.99)
    assert not GuidancePlan.always().should_switch(1.0)


@pytest.mark.parametrize(
    "text", ["", "sometimes", "switch", "switch:", "switch:abc", "switch:1.5", "switch:-0.1", "switch:0.5:maybe",
             "step:2.5", "step:-1", "interval:0.6:0.2", "interval:0.2", "adaptive:2", "always:0.5", "timestep:-3",
             "switch:nan", "switch:0.5:cond:extra"],
)
def test_malformed_strings(text):
    with pytest.raises(PlanParseError) as e:
        GuidancePlan.parse(text)
    assert str(e.value).startswith("plan: expected")
    assert repr(text) in str(e.value)


def test_non_string_plan():
    with pytest.raises(PlanParseError, match="plan: expected a plan string"):
        GuidancePlan.parse(0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: GuidancePlan.switch_at(1.2), "fraction"),
        (lambda: GuidancePlan.switch_at(-0.01), "fraction"),
        (lambda: GuidancePlan.switch_at(float("nan")), "fraction"),
        (lambda: GuidancePlan.switch_at(0.5, late="text"), "late"),
        (lambda: GuidancePlan.switch_at_step(-1), "step"),
        (lambda: GuidancePlan.switch_at_step(2.0), "step"),
        (lambda: GuidancePlan.interval(0.5, 0.4), "end"),
        (lambda: GuidancePlan.interval(-1, 0.4), "start"),
        (lambda: GuidancePlan.adaptive(1.5), "threshold"),
        (lambda: GuidancePlan.switch_at_timestep(float("inf")), "timestep"),
    ],
)
def test_bad_constructor_arguments(make, argument):
    with pytest.raises(InvalidArgumentError) as e:
        make()
    assert e.value.argument == argument
    assert str(e.value).startswith(f"{argument}: expected")
