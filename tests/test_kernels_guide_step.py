"""The guide_and_step op: compiled CPU kernel vs its torch oracle, and fused steps vs diffusers.

The fused rules' coefficients (plain Python, :mod:`cfgswitch.fused`) are checked against
``scheduler.step`` through the torch oracle without the compiled library, and again through the
compiled kernel when it is built; epsilon and v-prediction, leading and trailing spacing, with
and without zero-terminal-SNR betas.

Tolerances: latents and x0 are compared for exact equality (0.0) where both sides evaluate the
same float32 operations in the same order (the kernel is built with -ffp-contract=off); the
issue's bound is 1e-6. Cosines are sums over thousands of products, accumulated in double by
the kernel and in float32 by torch: they agree to 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cfgswitch import kernels
from cfgswitch.kernels import StepForm, guide_and_step, guide_and_step_reference, pack_params, pack_rows, rows_for_modes
from cfgswitch.schedulers import make_scheduler, set_timesteps
from cfgswitch.step_coefficients import fused_support
from cfgswitch.steppers import FusedStepper, ReferenceStepper, make_stepper
from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG

needs_compiled = pytest.mark.skipif(not kernels.HAS_COMPILED, reason="cfgswitch._kernels is not built (tools/dev_install.py)")
COEFFS = {  # plausible magnitudes of each form's coefficients
    StepForm.DDIM: (0.6, 0.8, 0.9, 0.43, 0.0, 0.0),
    StepForm.EULER: (3.1, 1.0, 3.1, -0.7, 0.0, 0.0),
    StepForm.MULTISTEP_1: (0.95, 0.31, 0.55, -0.21, 0.0, 0.0),
    StepForm.MULTISTEP_2: (0.95, 0.31, 0.55, -0.21, 1.7, -0.105),
    StepForm.DDIM_V: (0.6, 0.8, 0.9, 0.43, 0.0, 0.0),
    StepForm.EULER_V: (-0.95, 10.6, 3.1, -0.7, 0.0, 0.0),
    StepForm.MULTISTEP_1_V: (0.95, 0.31, 0.55, -0.21, 0.0, 0.0),
    StepForm.MULTISTEP_2_V: (0.95, 0.31, 0.55, -0.21, 1.7, -0.105),
}


def _inputs(guided, forms, shape=(4, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows_a, rows_b, n_rows = rows_for_modes(guided)
    pred = torch.randn((n_rows,) + shape, generator=gen)
    sample = torch.randn((len(guided),) + shape, generator=gen) * 3
    prev = torch.randn((len(guided),) + shape, generator=gen)
    rows = pack_rows(rows_a, rows_b, [int(f) for f in forms])
    params = pack_params([7.5 - b for b in range(len(guided))], [COEFFS[f] for f in forms])
    return pred, sample, prev, rows, params


@needs_compiled
@pytest.mark.parametrize("form", list(StepForm))
@pytest.mark.parametrize("guided", [(True,), (False,), (True, False, True), (False, True, False, False)])
def test_compiled_matches_reference_exactly(form, guided):
    forms = [form] * len(guided)
    pred, sample, prev, rows, params = _inputs(guided, forms)
    got = guide_and_step(pred, sample, rows, params, prev, want_x0=True, want_cosine=True, impl="compiled")
    ref = guide_and_step_reference(pred, sample, rows, params, prev, want_x0=True, want_cosine=True)
    assert torch.equal(got.latents, ref[0])
    assert torch.equal(got.x0, ref[1])
    g = torch.tensor(guided)
    assert torch.isnan(got.cosine[~g]).all() and torch.isnan(ref[2][~g]).all()
    torch.testing.assert_close(got.cosine[g], ref[2][g], rtol=0, atol=1e-6)


@needs_compiled
def test_mixed_forms_threads_and_in_place():
    # 3 x 4 x 96 x 96 = 110592 elements: two threads, several tiles per image.
    guided = (True, False, True)
    forms = [StepForm.MULTISTEP_2, StepForm.EULER_V, StepForm.DDIM]
    pred, sample, prev, rows, params = _inputs(guided, forms, shape=(4, 96, 96), seed=3)
    ref = guide_and_step_reference(pred, sample, rows, params, prev, want_x0=True, want_cosine=True)
    one = guide_and_step(pred, sample, rows, params, prev, want_x0=True, want_cosine=True, impl="compiled", threads=1)
    got = guide_and_step(pred, sample, rows, params, prev, want_x0=True, want_cosine=True, out=sample, impl="compiled",
                         threads=2)
    assert got.latents.data_ptr() == sample.data_ptr()
    torch.testing.assert_close(got.cosine, one.cosine, rtol=0, atol=0, equal_nan=True)  # fixed reduction order
    assert torch.equal(sample, ref[0])
    assert torch.equal(got.x0, ref[1])
    torch.testing.assert_close(got.cosine[[0, 2]], ref[2][[0, 2]], rtol=0, atol=1e-6)
    # The cosine of a guided image is torch's cosine_similarity of its two rows.
    u, c = pred[0].flatten(), pred[3].flatten()
    assert abs(float(got.cosine[0]) - float(torch.nn.functional.cosine_similarity(u, c, dim=0))) < 1e-6


@needs_compiled
def test_mixed_batch_equals_images_run_alone():
    guided = (False, True, True, False)
    forms = [StepForm.DDIM] * 4
    pred, sample, _, rows, params = _inputs(guided, forms, seed=5)
    together = guide_and_step(pred, sample, rows, params, impl="compiled").latents
    for b, g in enumerate(guided):
        idx = [b, 4 + sum(guided[:b])] if g else [b]
        alone = guide_and_step(
            pred[idx], sample[b : b + 1], pack_rows([0], [1 if g else -1], [0]), params[b : b + 1], impl="compiled"
        ).latents
        assert torch.equal(alone[0], together[b])


@needs_compiled
def test_compiled_cfg_combine_matches_reference():
    gen = torch.Generator().manual_seed(1)
    u, c = torch.randn(3, 4, 16, 16, generator=gen), torch.randn(3, 4, 16, 16, generator=gen)
    w = torch.tensor([7.5, 1.0, 3.3])
    assert torch.equal(kernels.cfg_combine(u, c, w), kernels.cfg_combine_reference(u, c, w))
    # The compiled op rounds as diffusers' pipeline does: u + w * (c - u) with a float scale.
    assert torch.equal(kernels.cfg_combine(u[:1], c[:1], w[:1]), u[:1] + 7.5 * (c[:1] - u[:1]))


def test_argument_errors():
    pred, sample, prev, rows, params = _inputs((True,), [StepForm.MULTISTEP_2])
    with pytest.raises(ValueError, match=r"prev: expected the previous x0 for image 0 \(form 3\)"):
        guide_and_step(pred, sample, rows, params, None)
    v_rows = rows.clone()
    v_rows[0, 2] = int(StepForm.MULTISTEP_2_V)
    with pytest.raises(ValueError, match=r"prev: expected the previous x0 for image 0 \(form 7\)"):
        guide_and_step(pred, sample, v_rows, params, None)
    v_rows[0, 2] = 8
    with pytest.raises(ValueError, match=r"rows\[0, 2\]: expected a form in 0..7, got 8"):
        guide_and_step(pred, sample, v_rows, params, prev)
    bad = rows.clone()
    bad[0, 1] = 7
    with pytest.raises(ValueError, match=r"rows\[0\]: expected rows in \[0, 2\)"):
        guide_and_step(pred, sample, bad, params, prev)
    with pytest.raises(ValueError, match=r"params: expected float32 of shape \(1, 8\)"):
        guide_and_step(pred, sample, rows, params[:, :6], prev)
    with pytest.raises(ValueError, match="pred: expected shape"):
        guide_and_step(pred[:, :2], sample, rows, params, prev)
    with pytest.raises(ValueError, match="impl: expected"):
        guide_and_step(pred, sample, rows, params, prev, impl="fast")


@needs_compiled
def test_raw_binding_checks_rows():
    pred, sample, prev, rows, params = _inputs((True,), [StepForm.DDIM])
    out = torch.empty_like(sample)
    bad = rows.clone()
    bad[0, 0] = 5
    mod = kernels.compiled_module()
    with pytest.raises(ValueError, match=r"image 0: row_a: expected a row in \[0, 2\), got 5"):
        mod.guide_and_step_f32(pred.data_ptr(), bad.data_ptr(), params.data_ptr(), sample.data_ptr(), 0,
                               out.data_ptr(), 0, 0, 1, sample.numel(), 2, 0)
    bad = rows.clone()
    bad[0, 2] = 8
    with pytest.raises(ValueError, match=r"image 0: form: expected 0..7, got 8"):
        mod.guide_and_step_f32(pred.data_ptr(), bad.data_ptr(), params.data_ptr(), sample.data_ptr(), 0,
                               out.data_ptr(), 0, 0, 1, sample.numel(), 2, 0)
    bad[0, 2] = int(StepForm.MULTISTEP_2_V)
    with pytest.raises(ValueError, match=r"image 0: prev: expected the previous x0 for form 7"):
        mod.guide_and_step_f32(pred.data_ptr(), bad.data_ptr(), params.data_ptr(), sample.data_ptr(), 0,
                               out.data_ptr(), 0, 0, 1, sample.numel(), 2, 0)
    with pytest.raises(ValueError, match="out: expected a non-null address"):
        mod.guide_and_step_f32(pred.data_ptr(), rows.data_ptr(), params.data_ptr(), sample.data_ptr(), 0, 0, 0, 0, 1,
                               sample.numel(), 2, 0)


# ------------------------------------------------------------------ steps vs diffusers' step
SCHEDULER_CASES = [
    ("ddim", {}),
    ("euler", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    # SD 2.x: v-prediction, and the zero-terminal-SNR recipe (trailing spacing, rescaled betas)
    ("ddim", {"prediction_type": "v_prediction"}),
    ("ddim", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
    ("euler", {"prediction_type": "v_prediction"}),
    ("euler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
    ("dpmpp_2m", {"prediction_type": "v_prediction"}),
    ("dpmpp_2m", {"prediction_type": "v_prediction", "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
    ("ddim", {"timestep_spacing": "trailing"}),
    ("euler", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
]


def _scheduler(name, extra, steps):
    sch = make_scheduler(name, {**SD_SCHEDULER_CONFIG, **extra})
    if extra:  # make_scheduler's own overrides (dpmpp_2m: order 2) yield to the case's
        sch = type(sch).from_config({**dict(sch.config), **extra})
    set_timesteps(sch, steps, "cpu")
    return sch


@pytest.mark.parametrize("impl", ["reference", pytest.param("compiled", marks=needs_compiled)])
@pytest.mark.parametrize("steps", [7, 16])
@pytest.mark.parametrize("name,extra", SCHEDULER_CASES)
def test_fused_steps_match_scheduler_step(name, extra, steps, impl):
    """Every step of a trajectory (guided and single steps mixed), from the same inputs.

    ``impl="reference"`` runs the fused rules' coefficients through the kernel's torch oracle, so
    the plain-Python coefficient code is tested with or without the compiled library.
    """
    ref_s = _scheduler(name, extra, steps)
    fused_s = copy.deepcopy(ref_s)
    weights = torch.tensor([7.5, 2.0, 5.0])
    ref = ReferenceStepper(ref_s, weights, [torch.Generator().manual_seed(i) for i in range(3)])
    if impl == "compiled":
        fused = make_stepper(fused_s, weights, [], torch.device("cpu"), torch.float32, "fused")
    else:
        assert fused_support(fused_s) is None
        fused = FusedStepper(fused_s, weights, torch.device("cpu"), impl="reference")
    assert isinstance(fused, FusedStepper)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 8, 8, generator=gen) * float(ref_s.init_noise_sigma)
    for i, t in enumerate(ref_s.timesteps):
        x_in = ref_s.scale_model_input(x, t)
        assert torch.equal(fused_s.scale_model_input(x, t), x_in)
        if i % 3 == 2:
            eps = torch.randn(3, 4, 8, 8, generator=gen)
            expected, got = ref.step(eps, t, x), fused.step(eps, t, x)
            cos = None
        else:
            pair = torch.randn(6, 4, 8, 8, generator=gen)
            expected, cos_ref = ref.guide_and_step(pair, t, x, want_cosine=True)
            got, cos = fused.guide_and_step(pair, t, x, want_cosine=True)
            torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
        assert (got - expected).abs().max().item() <= 1e-6, f"step {i}"
        assert torch.equal(got, expected), f"step {i}: not bit-identical"
        x = expected
    assert getattr(fused_s, "_step_index", None) == getattr(ref_s, "_step_index", None)
    if hasattr(ref_s, "model_outputs"):
        assert fused_s.lower_order_nums == ref_s.lower_order_nums
        for a, b in zip(fused_s.model_outputs, ref_s.model_outputs):
            assert torch.equal(a, b)


@needs_compiled
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_scheduler_step_can_take_over_a_fused_trajectory(name):
    """The fused stepper keeps step_index / model_outputs / lower_order_nums as step would."""
    steps, handover = 10, 4
    ref_s = _scheduler(name, {}, steps)
    mixed_s = copy.deepcopy(ref_s)
    fused = FusedStepper(mixed_s, torch.ones(2), torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    x_ref = torch.randn(2, 4, 4, 4, generator=gen) * float(ref_s.init_noise_sigma)
    x_mix = x_ref.clone()
    for i, t in enumerate(ref_s.timesteps):
        eps = torch.randn(2, 4, 4, 4, generator=gen)
        ref_s.scale_model_input(x_ref, t)
        mixed_s.scale_model_input(x_mix, t)
        x_ref = ref_s.step(eps, t, x_ref, return_dict=False)[0]
        x_mix = fused.step(eps, t, x_mix) if i < handover else mixed_s.step(eps, t, x_mix, return_dict=False)[0]
    assert torch.equal(x_mix, x_ref)


@pytest.mark.parametrize("name,extra,reason", [
    ("pndm", {}, "PNDMScheduler has no fused update"),
    ("unipc", {}, "UniPCMultistepScheduler has no fused update"),
    ("ddim", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("euler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("ddim", {"clip_sample": True}, "DDIMScheduler with thresholding or clip_sample"),
    ("euler_a", {}, "EulerAncestralDiscreteScheduler has no fused update"),
    ("dpmpp_2m", {"solver_order": 3}, "solver_order=3"),
    ("dpmpp_2m", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type='dpmsolver'"),
])
def test_uncovered_schedulers_fall_back(name, extra, reason, caplog):
    from cfgswitch.errors import BackendUnavailableError

    sch = _scheduler(name, extra, 10)
    stepper = make_stepper(sch, torch.ones(1), [], torch.device("cpu"), torch.float32, "auto")
    assert isinstance(stepper, ReferenceStepper) and stepper.kernel == "reference"
    with pytest.raises(BackendUnavailableError, match=reason):
        make_stepper(sch, torch.ones(1), [], torch.device("cpu"), torch.float32, "fused")


def test_dtype_without_kernel_falls_back():
    sch = _scheduler("ddim", {}, 10)
    stepper = make_stepper(sch, torch.ones(1), [], torch.device("cpu"), torch.bfloat16, "auto")
    assert stepper.kernel == "reference"


@needs_compiled
def test_inputs_the_kernel_cannot_take_use_scheduler_step_in_between():
    """A float64 prediction mid-trajectory goes through scheduler.step; the state stays consistent."""
    ref_s = _scheduler("dpmpp_2m", {}, 8)
    fused_s = copy.deepcopy(ref_s)
    fused = FusedStepper(fused_s, torch.ones(1), torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    x_ref = torch.randn(1, 4, 4, 4, generator=gen) * float(ref_s.init_noise_sigma)
    x_fused = x_ref.clone()
    for i, t in enumerate(ref_s.timesteps):
        eps = torch.randn(1, 4, 4, 4, generator=gen)
        odd = eps.double() if i in (3, 5) else eps
        x_ref = ref_s.step(odd, t, x_ref, return_dict=False)[0]
        x_fused = fused.step(odd, t, x_fused)
        assert x_fused.dtype == x_ref.dtype
        assert torch.equal(x_fused, x_ref), f"step {i}"


@needs_compiled
def test_self_check_refuses_coefficients_that_disagree_with_diffusers(monkeypatch):
    """If a diffusers release changed a formula, the schedule would run the reference, not wrong maths."""
    from collections import OrderedDict

    from cfgswitch import steppers
    from cfgswitch.errors import BackendUnavailableError
    from cfgswitch.fused import FUSED_RULES

    monkeypatch.setattr(steppers, "_PROBED", {})
    monkeypatch.setattr(steppers, "_PARAMS_CACHE", OrderedDict())
    rule = FUSED_RULES["DDIMScheduler"]
    real = rule.coefficients

    def drifted(s, key):
        form, c = real(s, key)
        return form, (c[0], c[1], c[2], c[3] * 1.001, c[4], c[5])

    monkeypatch.setattr(rule, "coefficients", drifted)
    sch = _scheduler("ddim", {}, 9)
    assert make_stepper(sch, torch.ones(1), [], torch.device("cpu"), torch.float32, "auto").kernel == "reference"
    with pytest.raises(BackendUnavailableError, match="no longer matches the fused coefficients"):
        make_stepper(sch, torch.ones(1), [], torch.device("cpu"), torch.float32, "fused")
    monkeypatch.setattr(rule, "coefficients", real)
    monkeypatch.setattr(steppers, "_PROBED", {})
    monkeypatch.setattr(steppers, "_PARAMS_CACHE", OrderedDict())
    assert make_stepper(sch, torch.ones(1), [], torch.device("cpu"), torch.float32, "auto").kernel == "fused"


def test_everything_works_without_the_compiled_module():
    """With cfgswitch._kernels missing, the ops fall back to torch and the loop to the reference."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["cfgswitch._kernels"] = None  # as if it had not been built
import torch
from cfgswitch import kernels
from cfgswitch.kernels import StepForm, guide_and_step, pack_params, pack_rows
from cfgswitch.schedulers import make_scheduler, set_timesteps
from cfgswitch.steppers import make_stepper
from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG
assert not kernels.HAS_COMPILED and not kernels.compiled_available("cpu", torch.float32)
res = guide_and_step(torch.ones(1, 4), torch.ones(1, 4), pack_rows([0], [-1], [0]),
                     pack_params([1.0], [(0.5, 1.0, 1.0, 0.25, 0, 0)]))
assert torch.equal(res.latents, torch.full((1, 4), 0.75)), res.latents
s = make_scheduler("ddim", SD_SCHEDULER_CONFIG)
set_timesteps(s, 5, "cpu")
assert make_stepper(s, torch.ones(1), [], torch.device("cpu"), torch.float32).kernel == "reference"
# The fused rules are plain Python: their coefficients still follow scheduler.step (torch oracle).
import copy
from cfgswitch.steppers import FusedStepper
for name in ("ddim", "euler", "dpmpp_2m"):
    ref = make_scheduler(name, {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    set_timesteps(ref, 6, "cpu")
    fused_s = copy.deepcopy(ref)
    fused = FusedStepper(fused_s, torch.ones(1), torch.device("cpu"), impl="reference")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=gen) * float(ref.init_noise_sigma)
    y = x.clone()
    for t in ref.timesteps:
        eps = torch.randn(1, 4, 4, 4, generator=gen)
        ref.scale_model_input(x, t)
        fused_s.scale_model_input(y, t)
        x = ref.step(eps, t, x, return_dict=False)[0]
        y = fused.step(eps, t, y)
        assert torch.equal(x, y), (name, int(t))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
