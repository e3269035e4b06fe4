"""Guidance plans: constructors, strings, schedules and malformed input."""

from __future__ import annotations

import pytest

from cfgswitch import GuidancePlan, InvalidArgumentError, PlanParseError


@pytest.mark.parametrize(
    "text", ["always", "switch:0.5", "switch:0.5:cond", "step:20", "timestep:500", "interval:0.2:0.6", "adaptive:0.995",
             "interval:0.2:0.6:cond", "adaptive:0.995:cond", "step:0", "adaptive:0.999:min=0.2",
             "adaptive:0.9997:min=0.2:cond"],
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
             "switch:nan", "switch:0.5:cond:extra", "switch:0.5:min=0.2", "adaptive:0.99:min=1.5", "adaptive:0.99:min=x",
             "adaptive:0.99:min=0.1:min=0.2", "auto"],
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
        (lambda: GuidancePlan.adaptive(0.99, min_fraction=1.2), "min_fraction"),
        (lambda: GuidancePlan.switch_at_timestep(float("inf")), "timestep"),
    ],
)
def test_bad_constructor_arguments(make, argument):
    with pytest.raises(InvalidArgumentError) as e:
        make()
    assert e.value.argument == argument
    assert str(e.value).startswith(f"{argument}: expected")


def test_adaptive_minimum_share_of_cfg_steps():
    plan = GuidancePlan.parse("adaptive:0.999:min=0.2")
    assert plan == GuidancePlan.adaptive(0.999, min_fraction=0.2) and plan.min_fraction == 0.2
    # 10 steps, min=0.2: steps 0 and 1 always run guided, so the earliest switch is after step 1
    assert [plan.may_switch(i, 10) for i in range(4)] == [False, True, True, True]
    assert [plan.should_switch(1.0, i, 10) for i in range(4)] == [False, True, True, True]
    assert not plan.should_switch(0.998, 5, 10)  # below the threshold: never
    # without the step index the minimum cannot be honoured: it never switches (CFG all the way)
    assert not plan.should_switch(1.0)
    # no minimum: the threshold alone decides, at any step
    assert GuidancePlan.adaptive(0.999).should_switch(0.9995, 0, 10)
    # 30 steps, min=0.2: the first late step is 6 at the earliest
    assert min(i + 1 for i in range(30) if plan.may_switch(i, 30)) == 6
    assert not GuidancePlan.switch_at(0.5).may_switch(20, 30)


def test_step_plan_messages():
    with pytest.raises(PlanParseError) as e:
        GuidancePlan.parse("step:-1")
    assert str(e.value) == "plan: expected a valid plan (step: an integer >= 0), got 'step:-1'"
    with pytest.raises(PlanParseError, match="'auto' is resolved against a model"):
        GuidancePlan.parse("auto")


# ---------------------------------------------------------------- one class per plan kind
@pytest.mark.parametrize("text, cls_name, fields", [
    ("always", "AlwaysPlan", {"late": "uncond"}),
    ("switch:0.25:cond", "SwitchPlan", {"fraction": 0.25, "late": "cond"}),
    ("step:7", "StepPlan", {"step": 7, "late": "uncond"}),
    ("timestep:500", "TimestepPlan", {"timestep": 500.0}),
    ("interval:0.2:0.6", "IntervalPlan", {"start": 0.2, "end": 0.6}),
    ("adaptive:0.9997:min=0.2:cond", "AdaptivePlan", {"threshold": 0.9997, "min_share": 0.2, "late": "cond"}),
])
def test_each_plan_kind_is_its_own_class_with_named_fields(text, cls_name, fields):
    import cfgswitch.plans as plans

    p = GuidancePlan.parse(text)
    assert type(p).__name__ == cls_name and isinstance(p, GuidancePlan)
    assert plans.PLAN_KINDS[p.kind] is type(p)  # the registry names each kind once
    for name, value in fields.items():
        assert getattr(p, name) == value
    assert not hasattr(p, "a") and not hasattr(p, "b")
    assert GuidancePlan.parse(str(p)) == p and str(p) == text


def test_plan_kinds_registry_matches_the_grammar():
    from cfgswitch.plans import PLAN_GRAMMAR, PLAN_KINDS

    assert sorted(PLAN_KINDS) == sorted(["always", "switch", "step", "timestep", "interval", "adaptive"])
    for kind in PLAN_KINDS:
        assert kind in PLAN_GRAMMAR
    assert GuidancePlan.switch_at(0.5) != GuidancePlan.switch_at_step(15)  # different kinds never compare equal
