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
from typing import Optional

from .errors import InvalidArgumentError, PlanParseError

#: Late modes: ``uncond`` runs eps(x_t, empty prompt) after the switch (the paper's rule),
#: ``cond`` runs eps(x_t, prompt) (diffusers' CFG cutoff, Adaptive Guidance).
LATE_MODES = ("uncond", "cond")
_KINDS = ("always", "switch", "step", "timestep", "interval", "adaptive")
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


@dataclass(frozen=True)
class GuidancePlan:
    """Which steps run classifier-free guidance and which run one prediction per image.

    Build plans with the constructors (:meth:`always`, :meth:`switch_at`,
    :meth:`switch_at_step`, :meth:`switch_at_timestep`, :meth:`interval`,
    :meth:`adaptive`) or :meth:`parse`; do not call the dataclass directly.

    Attributes:
        kind (`str`): one of ``always``, ``switch``, ``step``, ``timestep``, ``interval``, ``adaptive``.
        a (`float`): the first parameter (fraction, step, timestep, start or threshold).
        b (`float`): the second parameter (end of the interval; for ``adaptive`` the minimum
            share of CFG steps), else 0.
        late (`str`): ``uncond`` or ``cond``, what the late phase predicts.
    """

    kind: str
    a: float = 0.0
    b: float = 0.0
    late: str = "uncond"

    # ----------------------------------------------------------------- constructors
    @classmethod
    def always(cls) -> "GuidancePlan":
        """CFG at every step: the baseline (2B rows per step)."""
        return cls("always")

    @classmethod
    def switch_at(cls, fraction: float, late: str = "uncond") -> "GuidancePlan":
        """CFG for the first ``round(fraction * N)`` steps, then late (the paper's rule).

        Args:
            fraction (`float`): where the late phase starts, in [0, 1]; 1 is always-CFG.
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
        """
        return cls("switch", _check_fraction("fraction", fraction), 0.0, _check_late(late))

    @classmethod
    def switch_at_step(cls, step: int, late: str = "uncond") -> "GuidancePlan":
        """CFG for steps ``0..step-1``, then late. A step past the end means always-CFG.

        Args:
            step (`int`): the first late step, >= 0.
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError("step", "an integer >= 0", step)
        return cls("step", float(step), 0.0, _check_late(late))

    @classmethod
    def switch_at_timestep(cls, timestep: float, late: str = "uncond") -> "GuidancePlan":
        """CFG while the scheduler's timestep is above ``timestep``, late from the first step at or below it.

        Args:
            timestep (`float`): the timestep threshold, >= 0 (1000-step training schedules: 0..999).
            late (`str`, defaults to ``"uncond"``): what the late phase predicts.
        """
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)) or not math.isfinite(timestep):
            raise InvalidArgumentError("timestep", "a finite number >= 0", timestep)
        if timestep < 0:
            raise InvalidArgumentError("timestep", "a number >= 0", timestep)
        return cls("timestep", float(timestep), 0.0, _check_late(late))

    @classmethod
    def interval(cls, start: float, end: float, late: str = "uncond") -> "GuidancePlan":
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
        return cls("interval", s, e, _check_late(late))

    @classmethod
    def adaptive(cls, threshold: float, late: str = "uncond", min_fraction: float = 0.0) -> "GuidancePlan":
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
        return cls("adaptive", float(threshold), _check_fraction("min_fraction", min_fraction), _check_late(late))

    # ----------------------------------------------------------------- queries
    @property
    def is_adaptive(self) -> bool:
        """True when the plan decides from the predictions (the loop must feed cosines)."""
        return self.kind == "adaptive"

    def is_cfg(self, step: int, num_steps: int, timestep: float) -> bool:
        """Whether step ``step`` of ``num_steps`` (timestep ``timestep``) runs guided.

        For the adaptive plan this is the answer before any switch (always True);
        the loop applies :meth:`should_switch` on top.
        """
        k = self.kind
        if k in ("always", "adaptive"):
            return True
        if k == "switch":
            return step < _fraction_to_step(self.a, num_steps)
        if k == "step":
            return step < int(self.a)
        if k == "timestep":
            return float(timestep) > self.a
        if k == "interval":
            return _fraction_to_step(self.a, num_steps) <= step < _fraction_to_step(self.b, num_steps)
        raise PlanParseError("plan", PLAN_GRAMMAR, k)  # unreachable for constructed plans

    @property
    def min_fraction(self) -> float:
        """The adaptive plan's minimum share of CFG steps (0 for the other kinds)."""
        return self.b if self.kind == "adaptive" else 0.0

    def may_switch(self, step: int, num_steps: int) -> bool:
        """For the adaptive plan: whether a switch after step ``step`` of ``num_steps`` respects ``min=``.

        A switch after step ``step`` makes step ``step + 1`` the first late step; with ``min=F``
        it must be at least ``round(F * num_steps)``.
        """
        return self.kind == "adaptive" and step + 1 >= _fraction_to_step(self.min_fraction, num_steps)

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
        if self.kind != "adaptive" or min_cosine is None or min_cosine < self.a:
            return False
        if self.min_fraction == 0.0:
            return True
        return step is not None and num_steps is not None and self.may_switch(step, num_steps)

    def schedule(self, timesteps) -> list:
        """The static CFG/late decision for each timestep of a trajectory (adaptive: all True)."""
        n = len(timesteps)
        return [self.is_cfg(i, n, float(t)) for i, t in enumerate(timesteps)]

    # ----------------------------------------------------------------- strings
    def __str__(self) -> str:
        def num(x: float) -> str:
            text = repr(float(x))
            return text[:-2] if text.endswith(".0") else text

        if self.kind == "always":
            return "always"
        body = {
            "switch": f"switch:{num(self.a)}",
            "step": f"step:{num(self.a)}",
            "timestep": f"timestep:{num(self.a)}",
            "interval": f"interval:{num(self.a)}:{num(self.b)}",
            "adaptive": f"adaptive:{num(self.a)}" + (f":min={num(self.b)}" if self.b else ""),
        }[self.kind]
        return body if self.late == "uncond" else f"{body}:{self.late}"

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
        if kind == "adaptive" and len(minimum) == 1:
            args.remove(minimum[0])
            minimum_text = minimum[0][4:]
        elif minimum:
            raise PlanParseError("plan", f"min=F once, only in an adaptive plan ({PLAN_GRAMMAR})", text)
        else:
            minimum_text = "0"
        arity = {"always": 0, "switch": 1, "step": 1, "timestep": 1, "interval": 2, "adaptive": 1}
        if kind not in arity or len(args) != arity[kind] or (kind == "always" and late != "uncond" and len(parts) > 1):
            raise PlanParseError("plan", f"a plan string ({PLAN_GRAMMAR})", text)
        try:
            if kind == "step":
                if not args[0].lstrip("-").isdigit():
                    raise ValueError(args[0])
                values = [int(args[0])]
            else:
                values = [float(a) for a in args]
            min_fraction = float(minimum_text)
        except ValueError:
            raise PlanParseError("plan", f"a plan string with numeric parameters ({PLAN_GRAMMAR})", text) from None
        try:
            if kind == "always":
                return cls.always()
            if kind == "switch":
                return cls.switch_at(values[0], late)
            if kind == "step":
                return cls.switch_at_step(values[0], late)
            if kind == "timestep":
                return cls.switch_at_timestep(values[0], late)
            if kind == "interval":
                return cls.interval(values[0], values[1], late)
            return cls.adaptive(values[0], late, min_fraction)
        except InvalidArgumentError as e:
            raise PlanParseError("plan", f"a valid plan ({e.argument}: {e.expected})", text) from None


__all__ = ["GuidancePlan", "LATE_MODES", "PLAN_GRAMMAR"]
