"""Guidance rescale: the plain reference against diffusers' ``rescale_noise_cfg``, and inside ``guide_and_step``.

The reference is diffusers' own function and its pipeline's order of operations (combine with
a Python-float guidance scale, ``rescale_noise_cfg``, ``scheduler.step``). Both sides evaluate the
same float32 operations in the same order, so results are compared for exact equality (0.0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from cfgswitch import kernels
from cfgswitch.kernels import guide_and_step, pack_params, pack_rows, rescale_noise_cfg_reference
from cfgswitch.schedulers import make_scheduler, set_timesteps
from cfgswitch.step_coefficients import advance_state, coefficients, previous_x0, step_key
from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG

needs_compiled = pytest.mark.skipif(not kernels.HAS_COMPILED, reason="cfgswitch._kernels is not built (tools/dev_install.py)")
V_ZERO_SNR = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}


def _pair(batch=3, seed=0, shape=(4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn((batch,) + shape, generator=gen)
    c = u + 0.3 * torch.randn((batch,) + shape, generator=gen)
    return u, c


@pytest.mark.parametrize("phi", [0.7, 1.0, 0.25])
def test_reference_equals_diffusers_rescale_noise_cfg(phi):
    u, c = _pair()
    guided = u + 7.5 * (c - u)
    assert torch.equal(rescale_noise_cfg_reference(guided, c, phi), rescale_noise_cfg(guided, c, guidance_rescale=phi))


def test_per_image_factors_and_zero_leave_other_images_alone():
    u, c = _pair(batch=3, seed=1)
    guided = u + 5.0 * (c - u)
    got = rescale_noise_cfg_reference(guided, c, [0.7, 0.0, 0.3])
    assert torch.equal(got[0:1], rescale_noise_cfg(guided[0:1], c[0:1], guidance_rescale=0.7))
    assert torch.equal(got[1], guided[1])  # diffusers does not call rescale_noise_cfg at 0
    assert torch.equal(got[2:3], rescale_noise_cfg(guided[2:3], c[2:3], guidance_rescale=0.3))
    assert not torch.equal(got[0], guided[0])


def test_tensor_form_for_graphs_matches_the_reference():
    """``rescale_noise_cfg_rows`` (phi as a tensor) is within 1 ulp-ish of diffusers' own float maths."""
    from cfgswitch.kernels.guidance_rescale import rescale_noise_cfg_rows

    u, c = _pair(batch=3, seed=2)
    guided = u + 7.5 * (c - u)
    phi = [0.7, 0.0, 1.0]
    got = rescale_noise_cfg_rows(guided, c, torch.tensor(phi))
    torch.testing.assert_close(got, rescale_noise_cfg_reference(guided, c, phi), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], guided[1])



def test_tensor_form_exports_to_onnx_and_runs_on_onnxruntime(tmp_path):
    """What a guided graph would hold: exported (TorchScript exporter, opset 17) and run by ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime", reason="the graph check needs onnxruntime (the test extra has it)")
    from cfgswitch.kernels.guidance_rescale import rescale_noise_cfg_rows

    class Rescale(torch.nn.Module):
        def forward(self, g, c, phi):
            return rescale_noise_cfg_rows(g, c, phi)

    u, c = _pair(batch=3, seed=5)
    guided, phi = u + 7.5 * (c - u), torch.tensor([0.7, 0.0, 0.3])
    path = tmp_path / "rescale.onnx"
    torch.onnx.export(Rescale(), (guided, c, phi), str(path), input_names=["g", "c", "phi"], output_names=["out"],
                      opset_version=17, dynamo=False, dynamic_axes={"g": {0: "B"}, "c": {0: "B"}, "phi": {0: "B"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"g": guided.numpy(), "c": c.numpy(), "phi": phi.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), rescale_noise_cfg_reference(guided, c, [0.7, 0.0, 0.3]),
                               rtol=1e-5, atol=1e-5)  # ONNX Runtime's own reductions: float32 sums in its order


def test_bad_factors_are_refused():
    u, c = _pair(batch=2)
    with pytest.raises(ValueError, match=r"guidance_rescale: expected one value per image \(2\), got 3"):
        rescale_noise_cfg_reference(u, c, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"guidance_rescale: expected values in \[0, 1\], got 1.5"):
        rescale_noise_cfg_reference(u, c, 1.5)
    with pytest.raises(ValueError, match="noise_pred_text: expected shape"):
        rescale_noise_cfg_reference(u, c[:1], 0.5)


def _diffusers_step(sch, pair, t, x, weights, phi, guided):
    """One step as diffusers' pipeline takes it (per image, Python-float scales)."""
    batch = x.shape[0]
    eps = []
    for b in range(batch):
        if guided[b]:
            u, c = pair[b : b + 1], pair[batch + sum(guided[:b]) : batch + sum(guided[:b]) + 1]
            e = u + weights[b] * (c - u)
            e = rescale_noise_cfg(e, c, guidance_rescale=phi) if phi > 0 else e
        else:
            e = pair[b : b + 1]
        eps.append(e)
    return sch.step(torch.cat(eps), t, x, return_dict=False)[0]


@pytest.mark.parametrize("impl", ["reference", pytest.param("compiled", marks=needs_compiled)])
@pytest.mark.parametrize("name,extra", [
    ("ddim", V_ZERO_SNR),
    ("euler", V_ZERO_SNR),
    ("dpmpp_2m", V_ZERO_SNR),
    ("dpmpp_2m", {}),
])
def test_guide_and_step_with_rescale_matches_diffusers_steps(name, extra, impl):
    """A whole trajectory, one image late (no rescale there, as in diffusers), bit-identical."""
    base = make_scheduler(name, SD_SCHEDULER_CONFIG)
    ref_s = type(base).from_config({**dict(base.config), **extra})
    set_timesteps(ref_s, 9, "cpu")
    fused_s = copy.deepcopy(ref_s)
    weights, phi, guided = [7.5, 3.0, 5.0], 0.7, [True, False, True]
    rows_a, rows_b, n_rows = kernels.rows_for_modes(guided)
    gen = torch.Generator().manual_seed(7)
    x_ref = torch.randn(3, 4, 8, 8, generator=gen) * float(ref_s.init_noise_sigma)
    x_fused = x_ref.clone()
    for i, t in enumerate(ref_s.timesteps):
        pair = torch.randn(n_rows, 4, 8, 8, generator=gen)
        ref_s.scale_model_input(x_ref, t)
        fused_s.scale_model_input(x_fused, t)
        x_ref = _diffusers_step(ref_s, pair, t, x_ref, weights, phi, guided)
        key = step_key(fused_s, t)
        form, coeffs = coefficients(fused_s, key)
        rows = pack_rows(rows_a, rows_b, [int(form)] * 3)
        params = pack_params(weights, [coeffs] * 3)
        res = guide_and_step(pair, x_fused, rows, params, previous_x0(fused_s, key), want_x0=True, want_cosine=True,
                             impl=impl, guidance_rescale=phi)
        advance_state(fused_s, res.x0)
        x_fused = res.latents
        assert torch.equal(x_fused, x_ref), f"step {i}"
        # cosines stay those of the two original rows
        want = torch.nn.functional.cosine_similarity(pair[0].flatten(), pair[3].flatten(), dim=0)
        assert abs(float(res.cosine[0]) - float(want)) <= 1e-6 and torch.isnan(res.cosine[1])


def test_rescale_off_changes_nothing():
    u, c = _pair(batch=2, seed=3)
    pred, sample = torch.cat([u, c]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    rows = pack_rows([0, 1], [2, 3], [0, 0])
    params = pack_params([7.5, 7.5], [(0.6, 0.8, 0.9, 0.43, 0.0, 0.0)] * 2)
    plain = guide_and_step(pred, sample, rows, params, impl="reference").latents
    assert torch.equal(guide_and_step(pred, sample, rows, params, impl="reference", guidance_rescale=0.0).latents, plain)
    assert not torch.equal(guide_and_step(pred, sample, rows, params, impl="reference", guidance_rescale=0.7).latents,
                           plain)
