"""Guidance plans: for each step of a trajectory, CFG (2B UNet rows) or late (B rows).

A plan is a small immutable object. Static plans answer :meth:`GuidancePlan.is_cfg`
from the step index, the step count and the timestep alone; the adaptive plan
(Castillo et al., "Adaptive Guidance", 2023) also needs the cosine similarity
of the conditional and unconditional predictions, which the loop feeds it.

Each plan prints to and parses from a short string (``always``, ``switch:0.5``,
``switch:0.5:cond``, ``step:20``, ``timestep:500``, ``interval:0.2:0.6``,
``adaptive:0.9997:min=0.2:cond``) used by the command line and by serving. ``auto`` is not
a plan but asks ``generate`` for the model's recommended one (:mod:`cfgswitch.calibration`).

An adaptive plan may carry a minimum share of CFG steps (``min=F``): it never switches
before step ``round(F * N)``, so no threshold can turn CFG off at step 0 (on the embedded
model the cosine is already 0.9965 at step 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Type

from .errors import InvalidArgumentError, PlanParseError

#: Late modes: ``uncond`` runs eps(x_t, empty prompt) after the switch (the paper's rule),
#: ``cond`` runs eps(x_t, prompt) (diffusers' CFG cutoff, Adaptive Guidance).
LATE_MODES = ("uncond", "cond")
PLAN_GRAMMAR = (
    "always | switch:F[:late] | step:K[:late] | timestep:T[:late] | interval:F0:F1[:late] | adaptive:C[:min=F][:late]"
    " (F in [0, 1], K an integer >= 0, late is uncond or cond; generate also takes auto)"
)


def _fraction_to_step(fraction: float, num_steps: int) -> int:
    """Round ``fraction * num_steps`` half up: ``switch:0.5`` of 30 steps switches at step 15."""
    return int(math.floor(fraction * num_steps + 0.5))


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(name, "a finite number in [0, 1]", value)
    if not 0.0 <= float(value) <= 1.0:
        raise InvalidArgumentError(name, "a fraction in [0, 1]", value)
    return float(value)


def _check_late(late: str) -> str:
    if late not in LATE_MODES:
        raise InvalidArgumentError("late", "'uncond' or 'cond'", late)
    return late


def _num(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class GuidancePlan:
    """Which steps run classifier-free guidance and which run one prediction per image.

    Each plan kind is one small subclass with named fields (:class:`AlwaysPlan`,
    :class:`SwitchPlan`, :class:`StepPlan`, :class:`TimestepPlan`, :class:`IntervalPlan`,
    :class:`AdaptivePlan`), registered once in :data:`PLAN_KINDS` under its ``kind`` name. Build
    plans with the checked constructors (:meth:`always`, :meth:`switch_at`,
    :meth:`switch_at_step`, :meth:`switch_at_timestep`, :meth:`interval`, :meth:`adaptive`) or
    :meth:`parse`.

    Attributes:
        late (`str`): ``uncond`` or ``cond``, what the late phase predicts.
    """

    late: str = "uncond"
    #: The plan kind's registry name (its first word in the plan string).
    kind: ClassVar[str] = ""
    #: How many numbers follow the kind in the plan string.
    arity: ClassVar[int] = 0

    # ----------------------------------------------------------------- constructors
    @staticmethod
    def always() -> "AlwaysPlan":
        """CFG at every step: the baseline (2B rows per step)."""
        return AlwaysPlan()

    @staticmethod
    def switch_at(fraction: float, late: str = "uncond") -> "SwitchPlan":
        """CFG for the first ``round(fraction * N)`` steps, then late (the paper's rule).

        Args:
            fraction (`float`): where the late phase starts, in [0, 1]; 1 is always-CFG.
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
        """
        return SwitchPlan(_check_late(late), _check_fraction("fraction", fraction))

    @staticmethod
    def switch_at_step(step: int, late: str = "uncond") -> "StepPlan":
        """CFG for steps ``0..step-1``, then late. A step past the end means always-CFG.

        Args:
            step (`int`): the first late step, >= 0.
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError("step", "an integer >= 0", step)
        return StepPlan(_check_late(late), int(step))

    @staticmethod
    def switch_at_timestep(timestep: float, late: str = "uncond") -> "TimestepPlan":
        """CFG while the scheduler's timestep is above ``timestep``, late from the first step at or below it.

        Args:
            timestep (`float`): the timestep threshold, >= 0 (1000-step training schedules: 0..999).
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
        """
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)) or not math.isfinite(timestep):
            raise InvalidArgumentError("timestep", "a finite number >= 0", timestep)
        if timestep < 0:
            raise InvalidArgumentError("timestep", "a number >= 0", timestep)
        return TimestepPlan(_check_late(late), float(timestep))

    @staticmethod
    def interval(start: float, end: float, late: str = "uncond") -> "IntervalPlan":
        """CFG only for steps in ``[round(start * N), round(end * N))`` (Kynkäänniemi et al., 2024).

        Args:
            start (`float`): start of the guided window, a fraction in [0, 1].
            end (`float`): end of the guided window, a fraction in [start, 1].
            late (`str`, defaults to ``"uncond"``): what the other steps predict.
        """
        s = _check_fraction("start", start)
        e = _check_fraction("end", end)
        if e < s:
            raise InvalidArgumentError("end", f"a fraction >= start ({s})", end)
        return IntervalPlan(_check_late(late), s, e)

    @staticmethod
    def adaptive(threshold: float, late: str = "uncond", min_fraction: float = 0.0) -> "AdaptivePlan":
        """Per image: CFG until that image's cosine(eps_cond, eps_uncond) reaches ``threshold``, then late for good.

        Each image switches on its own (in ``generate`` and in the step engine), so an image
        never depends on the others in its batch.

        Args:
            threshold (`float`): cosine similarity threshold in [-1, 1]. It is model-specific:
                ``cfgswitch analyze`` recommends one (0.9997 on the embedded model).
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
            min_fraction (`float`, defaults to 0): the smallest share of steps that run guided;
                the plan never switches before step ``round(min_fraction * N)``.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise InvalidArgumentError("threshold", "a finite number in [-1, 1]", threshold)
        if not -1.0 <= threshold <= 1.0:
            raise InvalidArgumentError("threshold", "a cosine similarity in [-1, 1]", threshold)
        return AdaptivePlan(_check_late(late), float(threshold), _check_fraction("min_fraction", min_fraction))

    # ----------------------------------------------------------------- queries
    @property
    def is_adaptive(self) -> bool:
        """True when the plan decides from the predictions (the loop must feed cosines)."""
        return False

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        """Whether step ``step`` of ``num_steps`` (timestep ``timestep``) runs guided.

        For the adaptive plan this is the answer before any switch (always True);
        the loop applies :meth:`should_switch` on top.
        """
        raise NotImplementedError

    @property
    def min_fraction(self) -> float:
        """The adaptive plan's minimum share of CFG steps (0 for the other kinds)."""
        return 0.0

    def may_switch(self, step: int, num_steps: int) -> bool:
        """For the adaptive plan: whether a switch after step ``step`` of ``num_steps`` respects ``min=``.

        A switch after step ``step`` makes step ``step + 1`` the first late step; with ``min=F``
        it must be at least ``round(F * num_steps)``.
        """
        return False

    def should_switch(self, min_cosine: Optional[float], step: Optional[int] = None, num_steps: Optional[int] = None) -> bool:
        """For the adaptive plan: whether to run late from step ``step + 1`` on.

        True when the batch's smallest cosine similarity at step ``step`` reached the threshold
        and (:meth:`may_switch`) the minimum share of CFG steps has run. Without ``step`` and
        ``num_steps`` a plan with ``min=`` never switches (CFG all the way, never too little).

        Args:
            min_cosine (`float` or `None`): smallest per-image cosine of this step's predictions.
            step (`int`, optional): index of the step just run.
            num_steps (`int`, optional): steps of the trajectory.
        """
        return False

    def schedule(self, timesteps) -> list:
        """The static CFG/late decision for each timestep of a trajectory (adaptive: all True)."""
        n = len(timesteps)
        return [self.is_cfg(i, n, float(t)) for i, t in enumerate(timesteps)]

    # ----------------------------------------------------------------- strings
    def _body(self) -> str:
        """The plan string without its late mode."""
        return self.kind

    def __str__(self) -> str:
        body = self._body()
        return body if self.late == "uncond" else f"{body}:{self.late}"

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "GuidancePlan":
        """The plan of this kind from its parsed numbers (checked by the constructors)."""
        raise NotImplementedError

    @classmethod
    def parse(cls, text: "str | GuidancePlan") -> "GuidancePlan":
        """Parse a plan string (see the module docstring); a plan passes through unchanged.

        Raises:
            PlanParseError: the string is unknown or malformed; the message gives the grammar.
        """
        if isinstance(text, GuidancePlan):
            return text
        if not isinstance(text, str):
            raise PlanParseError("plan", f"a plan string ({PLAN_GRAMMAR})", text)
        parts = [p.strip() for p in text.strip().lower().split(":")]
        kind, args = parts[0], parts[1:]
        if kind == "auto":
            raise PlanParseError("plan", "a plan string; 'auto' is resolved against a model by Sampler.generate "
                                 "(plan='auto') and --plan auto", text)
        late = "uncond"
        if args and args[-1] in LATE_MODES:
            late = args.pop()
        minimum = [a for a in args if a.startswith("min=")]
        if kind == AdaptivePlan.kind and len(minimum) == 1:
            args.remove(minimum[0])
            minimum_text = minimum[0][4:]
        elif minimum:
            raise PlanParseError("plan", f"min=F once, only in an adaptive plan ({PLAN_GRAMMAR})", text)
        else:
            minimum_text = "0"
        plan_cls = PLAN_KINDS.get(kind)
        if (plan_cls is None or len(args) != plan_cls.arity
                or (plan_cls is AlwaysPlan and late != "uncond" and len(parts) > 1)):
            raise PlanParseError("plan", f"a plan string ({PLAN_GRAMMAR})", text)
        try:
            if plan_cls is StepPlan:
                if not args[0].lstrip("-").isdigit():
                    raise ValueError(args[0])
                values: List[float] = [int(args[0])]
            else:
                values = [float(a) for a in args]
            min_fraction = float(minimum_text)
        except ValueError:
            raise PlanParseError("plan", f"a plan string with numeric parameters ({PLAN_GRAMMAR})", text) from None
        try:
            return plan_cls._from_args(values, late, min_fraction)
        except InvalidArgumentError as e:
            raise PlanParseError("plan", f"a valid plan ({e.argument}: {e.expected})", text) from None


@dataclass(frozen=True)
class AlwaysPlan(GuidancePlan):
    """CFG at every step (``always``)."""

    kind: ClassVar[str] = "always"
    arity: ClassVar[int] = 0

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        return True

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "AlwaysPlan":
        return GuidancePlan.always()


@dataclass(frozen=True)
class SwitchPlan(GuidancePlan):
    """CFG for the first ``round(fraction * N)`` steps (``switch:F``).

    Attributes:
        fraction (`float`): where the late phase starts, in [0, 1].
    """

    fraction: float = 0.5
    kind: ClassVar[str] = "switch"
    arity: ClassVar[int] = 1

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        return step < _fraction_to_step(self.fraction, num_steps)

    def _body(self) -> str:
        return f"switch:{_num(self.fraction)}"

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "SwitchPlan":
        return GuidancePlan.switch_at(values[0], late)


@dataclass(frozen=True)
class StepPlan(GuidancePlan):
    """CFG for steps ``0..step-1`` (``step:K``).

    Attributes:
        step (`int`): the first late step.
    """

    step: int = 0
    kind: ClassVar[str] = "step"
    arity: ClassVar[int] = 1

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        return step < self.step

    def _body(self) -> str:
        return f"step:{self.step}"

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "StepPlan":
        return GuidancePlan.switch_at_step(int(values[0]), late)


@dataclass(frozen=True)
class TimestepPlan(GuidancePlan):
    """CFG while the timestep is above ``timestep`` (``timestep:T``).

    Attributes:
        timestep (`float`): the threshold timestep.
    """

    timestep: float = 0.0
    kind: ClassVar[str] = "timestep"
    arity: ClassVar[int] = 1

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        return float(timestep) > self.timestep

    def _body(self) -> str:
        return f"timestep:{_num(self.timestep)}"

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "TimestepPlan":
        return GuidancePlan.switch_at_timestep(values[0], late)


@dataclass(frozen=True)
class IntervalPlan(GuidancePlan):
    """CFG only inside ``[round(start * N), round(end * N))`` (``interval:F0:F1``).

    Attributes:
        start, end (`float`): the guided window, fractions of the trajectory.
    """

    start: float = 0.0
    end: float = 1.0
    kind: ClassVar[str] = "interval"
    arity: ClassVar[int] = 2

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        return _fraction_to_step(self.start, num_steps) <= step < _fraction_to_step(self.end, num_steps)

    def _body(self) -> str:
        return f"interval:{_num(self.start)}:{_num(self.end)}"

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "IntervalPlan":
        return GuidancePlan.interval(values[0], values[1], late)


@dataclass(frozen=True)
class AdaptivePlan(GuidancePlan):
    """Per image, CFG until the cosine of its two predictions reaches ``threshold`` (``adaptive:C[:min=F]``).

    Attributes:
        threshold (`float`): the cosine similarity threshold.
        min_share (`float`): the smallest share of steps that run guided (``min=F``).
    """

    threshold: float = 1.0
    min_share: float = 0.0
    kind: ClassVar[str] = "adaptive"
    arity: ClassVar[int] = 1

    @property
    def is_adaptive(self) -> bool:
        return True

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        return True

    @property
    def min_fraction(self) -> float:
        return self.min_share

    def may_switch(self, step: int, num_steps: int) -> bool:
        return step + 1 >= _fraction_to_step(self.min_share, num_steps)

    def should_switch(self, min_cosine: Optional[float], step: Optional[int] = None, num_steps: Optional[int] = None) -> bool:
        if min_cosine is None or min_cosine < self.threshold:
            return False
        if self.min_share == 0.0:
            return True
        return step is not None and num_steps is not None and self.may_switch(step, num_steps)

    def _body(self) -> str:
        return f"adaptive:{_num(self.threshold)}" + (f":min={_num(self.min_share)}" if self.min_share else "")

    @classmethod
    def _from_args(cls, values: List[float], late: str, min_fraction: float) -> "AdaptivePlan":
        return GuidancePlan.adaptive(values[0], late, min_fraction)


#: Every plan kind by its name: the one registry the parser, the CLI help and serving read.
PLAN_KINDS: Dict[str, Type[GuidancePlan]] = {
    c.kind: c for c in (AlwaysPlan, SwitchPlan, StepPlan, TimestepPlan, IntervalPlan, AdaptivePlan)
}


__all__ = ["AdaptivePlan", "AlwaysPlan", "GuidancePlan", "IntervalPlan", "LATE_MODES", "PLAN_GRAMMAR", "PLAN_KINDS",
           "StepPlan", "SwitchPlan", "TimestepPlan"]
