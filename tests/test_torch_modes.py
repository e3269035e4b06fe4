"""The torch backend's UNet modes: eager, torch.compile, CUDA graphs (issue 13, DESIGN section 7)."""

from __future__ import annotations

import logging

import pytest
import torch

from cfgswitch import Sampler
from cfgswitch.errors import BackendUnavailableError, InvalidArgumentError

PLAN = "switch:0.5"  # both UNet shapes: 2B rows (CFG phase), then B rows (late phase)


def _latents(sampler, steps=4):
    return sampler.generate(["a red circle", "a blue square"], steps=steps, plan=PLAN, seed=3, output_type="latent").latents


def test_eager_mode_is_the_default_and_reported(tiny_model_dir, tiny_sampler):
    s = Sampler.load(tiny_model_dir, backend="torch", mode="eager")
    assert s.runners.info["mode"] == "eager" and tiny_sampler.runners.info["mode"] == "eager"
    torch.testing.assert_close(_latents(s), _latents(tiny_sampler), rtol=0, atol=0)


def test_unknown_mode_and_graphs_on_cpu_are_refused_before_loading(tmp_path):
    missing = tmp_path / "not-loaded"  # the mode is checked before the folder is read
    with pytest.raises(InvalidArgumentError, match=r"^mode: expected one of eager, compile, graphs, got 'jit'$"):
        Sampler.from_diffusers(missing, mode="jit")
    with pytest.raises(BackendUnavailableError, match=r"mode 'graphs' captures CUDA graphs and needs a CUDA device; got device cpu"):
        Sampler.from_diffusers(missing, mode="graphs")


@pytest.mark.slow
def test_compile_mode_matches_eager_and_compiles_once_per_shape(tiny_model_dir, tiny_sampler, tmp_path, monkeypatch, caplog):
    """torch.compile through dynamo and AOTAutograd (``aot_eager``: the CPU-cheap backend; Inductor on a CPU takes
    minutes for this UNet). Same ops as eager, so the latents agree to 1e-5."""
    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path))
    torch._dynamo.reset()
    s = Sampler.from_diffusers(tiny_model_dir, mode="compile", compile_options={"backend": "aot_eager"})
    with caplog.at_level(logging.INFO, logger="cfgswitch.runners.torch_modes"):
        first = _latents(s)
        second = _latents(s)
    torch.testing.assert_close(first, _latents(tiny_sampler), rtol=0, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    compiled = s.runners.unet._compiled
    assert sorted(k[0][0][0] for k in compiled.seen) == [2, 4]  # B and 2B rows, each compiled once
    assert caplog.text.count("compiling for") == 2
    assert s.runners.info["mode"] == "compile"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none on CPU CI machines)")
def test_graphs_mode_matches_eager_on_cuda(tiny_model_dir):
    eager = Sampler.from_diffusers(tiny_model_dir, device="cuda")
    graphs = Sampler.from_diffusers(tiny_model_dir, device="cuda", mode="graphs")
    a, b = _latents(eager), _latents(graphs)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)  # same kernels; capture may pick other algorithms
    assert len(graphs.runners.unet._graphs.graphs) == 2
    torch.testing.assert_close(_latents(graphs), b, rtol=0, atol=0)  # replayed, not recaptured
    assert len(graphs.runners.unet._graphs.graphs) == 2
