"""The fused-rule registry (``cfgswitch.fused``): plain Python, no compiled library needed.

The rules' numbers are checked against ``scheduler.step`` in ``test_kernels_guide_step.py``
(``impl="reference"`` runs without the compiled kernel); here: the registry itself.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from cfgswitch import SCHEDULER_NAMES
from cfgswitch.fused import FUSED_RULES, FUSED_SCHEDULER_NAMES, rule_for, rule_for_key
from cfgswitch.kernels import StepForm
from cfgswitch.schedulers import make_scheduler, set_timesteps
from cfgswitch.step_coefficients import advance_state, coefficients, fused_support, step_key
from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG


@pytest.mark.parametrize("class_name", sorted(FUSED_RULES))
def test_each_rule_belongs_to_a_scheduler_name(class_name):
    rule = FUSED_RULES[class_name]
    assert rule.scheduler_name in SCHEDULER_NAMES
    sch = make_scheduler(rule.scheduler_name, SD_SCHEDULER_CONFIG)
    assert type(sch).__name__ == class_name and rule_for(sch) is rule and fused_support(sch) is None
    assert rule.needs_x0 == hasattr(sch, "model_outputs")  # multistep schedulers keep x0 between steps


@pytest.mark.parametrize("prediction,forms", [
    ("epsilon", {StepForm.DDIM, StepForm.EULER, StepForm.MULTISTEP_1, StepForm.MULTISTEP_2}),
    ("v_prediction", {StepForm.DDIM_V, StepForm.EULER_V, StepForm.MULTISTEP_1_V, StepForm.MULTISTEP_2_V}),
])
def test_forms_follow_the_prediction_type(prediction, forms):
    seen = set()
    for name in FUSED_SCHEDULER_NAMES:
        sch = make_scheduler(name, {**SD_SCHEDULER_CONFIG, "prediction_type": prediction})
        set_timesteps(sch, 4, "cpu")
        for t in sch.timesteps:
            key = step_key(sch, t)
            seen.add(coefficients(sch, key)[0])
            advance_state(sch, torch.zeros(1, 4, 2, 2))
    assert seen == forms


def test_a_subclass_has_no_rule():
    class Custom(DDIMScheduler):
        pass

    sch = Custom.from_config(SD_SCHEDULER_CONFIG)
    assert rule_for(sch) is None
    assert fused_support(sch) == "Custom has no fused update (covered: ddim, euler, dpmpp_2m)"
    with pytest.raises(ValueError, match="scheduler: expected a scheduler with a fused rule"):
        step_key(sch, torch.tensor(1))


def test_unknown_step_key_is_refused():
    with pytest.raises(ValueError, match=r"key: expected a step key of ddim, dpm, euler, got \('heun', 3\)"):
        rule_for_key(("heun", 3))
