"""Shared fixtures: tiny random-weight Stable Diffusion models built offline."""

from __future__ import annotations

import os
import tempfile

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning, so the
# test process, the servers it starts and other processes on 2 cores do not starve each other.
# Results do not change (the thread count is the same); only waiting does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Engine, OpenVINO and ONNX Runtime caches of the test run stay out of the user's cache folder.
if "CFGSWITCH_CACHE" not in os.environ:
    import atexit
    import shutil

    os.environ["CFGSWITCH_CACHE"] = tempfile.mkdtemp(prefix="cfgswitch-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CFGSWITCH_CACHE"], True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny diffusers StableDiffusionPipeline (random weights, 16 px images by default)."""
    from cfgswitch.tiny_model import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipe):
    """The tiny model saved as a diffusers folder with safetensors weights."""
    from cfgswitch.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", pipeline=tiny_pipe)


@pytest.fixture(scope="session")
def tiny_sampler(tiny_model_dir):
    """A torch-backend Sampler over the saved tiny model."""
    from cfgswitch import Sampler

    return Sampler.from_diffusers(tiny_model_dir)


@pytest.fixture(scope="session")
def sdxl_pipe():
    """A tiny random-weight ``StableDiffusionXLPipeline`` (diffusers' ``get_dummy_components`` style)."""
    from cfgswitch.tiny_model import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def sdxl_sampler(sdxl_pipe):
    """The tiny SDXL pipeline on the torch backend."""
    from cfgswitch import Sampler

    return Sampler.from_diffusers(sdxl_pipe)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: the tiny models run fastest on one, above all on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
