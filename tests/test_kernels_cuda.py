"""The CUDA guide_and_step kernel against its torch oracle (runs on a GPU machine, skips elsewhere).

The library comes from the build (``tools/dev_install.py --cuda`` or ``pip install``); when it is
absent and ``nvcc`` exists, the fixture compiles ``kernels/cuda/guide_and_step.cu`` with nvcc
alone into a temporary folder (no CMake or pybind11 needed).

Tolerances: float32 uses the _rn intrinsics without FMA contraction, the same operation order as
the oracle, so latents and x0 agree to 1 ulp (asserted: rtol 1e-6, atol 1e-6). float16 buffers
are computed in float32 and rounded once, so they sit within half an fp16 ulp of the float32
oracle run on the same (upcast) inputs (asserted: rtol 1e-3, atol 1e-3). Cosines are block sums
in float32 then double: atol 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cfgswitch.kernels import StepForm, guide_and_step_reference, pack_params, pack_rows, rows_for_modes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
COEFFS = {
    StepForm.DDIM: (0.6, 0.8, 0.9, 0.43, 0.0, 0.0),
    StepForm.EULER: (3.1, 1.0, 3.1, -0.7, 0.0, 0.0),
    StepForm.MULTISTEP_1: (0.95, 0.31, 0.55, -0.21, 0.0, 0.0),
    StepForm.MULTISTEP_2: (0.95, 0.31, 0.55, -0.21, 1.7, -0.105),
    StepForm.DDIM_V: (0.6, 0.8, 0.9, 0.43, 0.0, 0.0),
    StepForm.EULER_V: (-0.95, 10.6, 3.1, -0.7, 0.0, 0.0),
    StepForm.MULTISTEP_1_V: (0.95, 0.31, 0.55, -0.21, 0.0, 0.0),
    StepForm.MULTISTEP_2_V: (0.95, 0.31, 0.55, -0.21, 1.7, -0.105),
}


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in sorted(Path("/usr/local").glob("cuda*/bin/nvcc")):
        return str(candidate)
    return None


@pytest.fixture(scope="module")
def cuda_kernels(tmp_path_factory):
    """Make sure ``libcfgswitch_cuda.so`` is loadable: the built one, or one compiled here with nvcc."""
    from cfgswitch.kernels import guide_step

    if guide_step.has_cuda_kernels() and guide_step.cuda_library() is not None:
        yield guide_step
        return
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("libcfgswitch_cuda.so is not built and no nvcc exists to build it (tools/dev_install.py --cuda)")
    out = tmp_path_factory.mktemp("cuda") / "libcfgswitch_cuda.so"
    major, minor = torch.cuda.get_device_capability()
    cmd = [nvcc, "-O3", "-std=c++17", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-shared",
           "-Xcompiler", "-fPIC", "-cudart", "static", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
           "-I", str(ROOT / "kernels" / "include"), str(ROOT / "kernels" / "cuda" / "guide_and_step.cu"), "-o", str(out)]
    subprocess.run(cmd, check=True)
    os.environ["CFGSWITCH_CUDA_LIBRARY"] = str(out)
    guide_step.cuda_library.cache_clear()
    assert guide_step.cuda_library() is not None
    yield guide_step
    os.environ.pop("CFGSWITCH_CUDA_LIBRARY", None)
    guide_step.cuda_library.cache_clear()


def _inputs(guided, forms, dtype, shape=(4, 64, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows_a, rows_b, n_rows = rows_for_modes(guided)
    pred = torch.randn((n_rows,) + shape, generator=gen).to(dtype)
    sample = (torch.randn((len(guided),) + shape, generator=gen) * 3).to(dtype)
    prev = torch.randn((len(guided),) + shape, generator=gen).to(dtype)
    rows = pack_rows(rows_a, rows_b, [int(f) for f in forms])
    params = pack_params([7.5 - b for b in range(len(guided))], [COEFFS[f] for f in forms])
    return pred, sample, prev, rows, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", list(StepForm))
@pytest.mark.parametrize("guided", [(True,), (True, False, True)])
def test_cuda_matches_oracle(cuda_kernels, dtype, form, guided):
    forms = [form] * len(guided)
    pred, sample, prev, rows, params = _inputs(guided, forms, dtype)
    want = guide_and_step_reference(pred.float(), sample.float(), rows, params, prev.float(), want_x0=True,
                                    want_cosine=True)
    dev = torch.device("cuda")
    got = cuda_kernels.guide_and_step(pred.to(dev), sample.to(dev), rows.to(dev), params.to(dev), prev.to(dev),
                                      want_x0=True, want_cosine=True, impl="compiled")
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    assert got.latents.dtype == dtype
    torch.testing.assert_close(got.latents.float().cpu(), want[0], **tol)
    torch.testing.assert_close(got.x0.float().cpu(), want[1], **tol)
    g = torch.tensor(guided)
    cos = got.cosine.cpu()
    assert torch.isnan(cos[~g]).all()
    torch.testing.assert_close(cos[g], want[2][g], rtol=0, atol=1e-5)


def test_workspace_resets_and_streams(cuda_kernels):
    dev = torch.device("cuda")
    guided = (True, True, False, True)
    forms = [StepForm.MULTISTEP_2] * 4
    pred, sample, prev, rows, params = (t.to(dev) for t in _inputs(guided, forms, torch.float32, (4, 128, 128), 4))
    first = cuda_kernels.guide_and_step(pred, sample, rows, params, prev, want_cosine=True, impl="compiled")
    again = cuda_kernels.guide_and_step(pred, sample, rows, params, prev, want_cosine=True, impl="compiled")
    torch.testing.assert_close(again.cosine, first.cosine, rtol=0, atol=1e-6, equal_nan=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        other = cuda_kernels.guide_and_step(pred, sample, rows, params, prev, want_cosine=True, impl="compiled")
    stream.synchronize()
    assert torch.equal(other.latents, first.latents)
    torch.testing.assert_close(other.cosine, first.cosine, rtol=0, atol=1e-6, equal_nan=True)
    in_place = sample.clone()
    cuda_kernels.guide_and_step(pred, in_place, rows, params, prev, out=in_place, impl="compiled")
    assert torch.equal(in_place, first.latents)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_fused_stepper_on_cuda_follows_scheduler_step(cuda_kernels, name):
    pytest.importorskip("diffusers", reason="the scheduler comparison needs diffusers")
    import copy

    from cfgswitch.schedulers import make_scheduler, set_timesteps
    from cfgswitch.steppers import FusedStepper, ReferenceStepper
    from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG

    dev = torch.device("cuda")
    ref_s = make_scheduler(name, SD_SCHEDULER_CONFIG)
    set_timesteps(ref_s, 12, dev)
    fused_s = copy.deepcopy(ref_s)
    weights = torch.full((2,), 7.5, device=dev)
    ref = ReferenceStepper(ref_s, weights, [])
    fused = FusedStepper(fused_s, weights, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen, device=dev) * float(ref_s.init_noise_sigma)
    for t in ref_s.timesteps:
        ref_s.scale_model_input(x, t)
        fused_s.scale_model_input(x, t)
        pair = torch.randn(4, 4, 64, 64, generator=gen, device=dev)
        want, _ = ref.guide_and_step(pair, t, x)
        got, _ = fused.guide_and_step(pair, t, x)
        # torch on CUDA divides by a scalar as a multiplication by its reciprocal: 1-2 ulp apart.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = want
