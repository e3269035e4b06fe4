"""One backend registry, one assembly path, and the CFG role's ``predict_pair`` on every backend (issue 13)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _bundle_fixtures import ort_sampler, tiny_bundle  # noqa: F401  (fixtures)

from cfgswitch import Sampler
from cfgswitch.backends.registry import BACKENDS, BackendEntry, backend_names, register
from cfgswitch.cli import main
from cfgswitch.errors import BundleError, InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ names defined once
def test_every_reader_takes_the_names_from_the_registry():
    from cfgswitch.benchmarks import config as bench_config
    from cfgswitch.bundle_loading import BACKEND_OPTIONS
    from cfgswitch.sampler import BACKENDS as SAMPLER_BACKENDS

    names = tuple(BACKENDS)
    assert names[:3] == ("torch", "onnxruntime", "tensorrt")
    assert SAMPLER_BACKENDS == names == bench_config.BACKENDS == backend_names()
    assert set(BACKEND_OPTIONS) == set(backend_names("bundle")) == set(names) - {"torch"}
    assert BACKEND_OPTIONS["onnxruntime"] == BACKENDS["onnxruntime"].options


def test_no_module_spells_the_backend_list_again():
    """The registry is the only place a tuple of backend names is written."""
    literal = re.compile(r"""\(\s*["']torch["']\s*,\s*["']onnxruntime["']""")
    offenders = [str(p.relative_to(ROOT)) for folder in ("engine", "export", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py") if literal.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("command", [["generate", "a fox"], ["serve"], ["analyze"]])
def test_cli_backend_choices_come_from_the_registry(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--backend", "jax"])
    assert exit_info.value.code == 2
    choices = ", ".join(repr(n) for n in backend_names())
    assert f"argument --backend: invalid choice: 'jax' (choose from {choices})" in capsys.readouterr().err


# ------------------------------------------------------------------ Sampler.load: options, folders, default
def test_torch_backend_refuses_unknown_options_with_the_valid_ones(tiny_model_dir):
    # Before the registry this raised a raw TypeError from from_diffusers.
    with pytest.raises(InvalidArgumentError, match=r"^options of backend 'torch': expected some of device, dtype, mode, compile_options, got 'cuda_graphs'$"):
        Sampler.load(tiny_model_dir, backend="torch", cuda_graphs=True)
    with pytest.raises(InvalidArgumentError, match=r"options of backend 'torch'.*got 'providers, threads'"):
        Sampler.load(tiny_model_dir, threads=2, providers="cpu")


def test_bundle_backend_on_a_folder_without_manifest_says_not_a_bundle(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "unet.onnx").write_bytes(b"x")
    for backend in backend_names("bundle"):
        with pytest.raises(BundleError, match=r"no manifest.json \(not a bundle; make one with: cfgswitch export MODEL_DIR"):
            Sampler.load(folder, backend=backend)


def test_load_default_is_the_embedded_model():
    from cfgswitch.default_model import resolve_model

    path = resolve_model("default")
    s = Sampler.load("default")
    assert s.backend == "torch" and s.source == str(path)
    ref = Sampler.from_diffusers(path)
    assert s.spec == ref.spec
    assert Sampler.from_diffusers("default").spec == ref.spec  # "default" wherever a model is taken


# ------------------------------------------------------------------ registering and assembling
def test_a_registered_backend_is_loaded_by_name_and_checked(tiny_bundle):  # noqa: F811
    entry = BackendEntry(name="onnxruntime-again", factory="cfgswitch.runners.onnxruntime:onnxruntime_runners",
                         options=("threads",), extra="cpu", module="onnxruntime", description="test entry")
    register(entry)
    try:
        with pytest.raises(InvalidArgumentError, match="backend name: expected a name not yet registered"):
            register(entry)
        s = Sampler.load(tiny_bundle, backend="onnxruntime-again", threads=1)
        assert s.runners.info["threads"] == 1 and s.runners.info["providers"] == ["CPUExecutionProvider"]
        with pytest.raises(InvalidArgumentError, match=r"options of backend 'onnxruntime-again': expected some of threads, "
                                                       r"got 'providers'"):
            Sampler.load(tiny_bundle, backend="onnxruntime-again", providers="cpu")
    finally:
        del BACKENDS["onnxruntime-again"]
    assert "onnxruntime-again" not in backend_names()


def test_pick_backend_follows_the_registry_ranks(tiny_bundle):  # noqa: F811
    from cfgswitch.backends.assembly import pick_backend
    from cfgswitch.bundle import read_manifest

    b = read_manifest(tiny_bundle)
    # on a CPU: OpenVINO ahead of ONNX Runtime (the documented rule), ONNX Runtime when OpenVINO is missing
    assert pick_backend(b, importable=lambda m: True) == ("openvino", "the bundle has no TensorRT plans")
    assert pick_backend(b, importable=lambda m: m == "onnxruntime") == (
        "onnxruntime", "the bundle has no TensorRT plans; openvino does not import")


def test_assemble_from_runners_equals_sampler_load(tiny_bundle, ort_sampler):  # noqa: F811
    from cfgswitch.backends.assembly import assemble

    s = assemble(tiny_bundle, runners=ort_sampler.runners)
    a = s.generate(["a red square"], steps=3, seed=2, output_type="latent").latents
    b = ort_sampler.generate(["a red square"], steps=3, seed=2, output_type="latent").latents
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s.spec == ort_sampler.spec and s.scheduler_config == ort_sampler.scheduler_config


def test_missing_tensorrt_for_rtx_plans_names_its_extra(tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    """Plans built by TensorRT for RTX are loaded with tensorrt_rtx; without it the error names its extra."""
    from cfgswitch.export.build import BuildOptions, BuildTarget, build_bundle
    from cfgswitch.errors import BackendUnavailableError

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    build_bundle(copy, BuildOptions(), BuildTarget("1.7.1.116", "portable", "none", "tensorrt-rtx"), lambda *a: b"x" * 64,
                 progress=False)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailableError, match=r"needs tensorrt-rtx.*pip install 'cfgswitch\[tensorrt-rtx\]'"):
        Sampler.load(copy, backend="tensorrt")


# ------------------------------------------------------------------ the CFG role's predict_pair
def _pair_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, 4, 8, 8), generator=gen)
    timestep = torch.tensor([701.0, 701.0])
    embeds = torch.randn((4, 77, 32), generator=gen)  # [uncond_0, uncond_1, cond_0, cond_1]
    return sample, timestep, embeds


def _diffusers_pair(unet, sample, timestep, embeds):
    """The reference, as diffusers' pipeline computes it: the UNet on [x; x] with [uncond; cond]."""
    with torch.no_grad():
        return unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states=embeds).sample


def test_torch_predict_pair_matches_diffusers(tiny_pipe, tiny_sampler):
    sample, timestep, embeds = _pair_inputs()
    ref = _diffusers_pair(tiny_pipe.unet, sample, timestep, embeds)
    pair = tiny_sampler.runners.unet_cfg.predict_pair(sample, timestep, embeds)
    assert pair.shape == (4, 4, 8, 8)
    torch.testing.assert_close(pair, ref, rtol=0, atol=1e-6)  # the same modules: only op-order noise


def test_onnxruntime_predict_pair_every_path_matches_diffusers(tiny_pipe, ort_sampler):  # noqa: F811
    """ORT (plain graph on 2B rows), the shared layout's plain graph, BLS two-engines (two B-row calls of the late
    graph) and a guided-graph-only runner (both halves equal) all give diffusers' pair to 1e-4 (ORT vs torch CPU)."""
    from cfgswitch.runners.graph_runners import GraphGuidedUNet

    sample, timestep, embeds = _pair_inputs(1)
    ref = _diffusers_pair(tiny_pipe.unet, sample, timestep, embeds)
    cfg = ort_sampler.runners.unet_cfg
    guided_graph, plain_graph = cfg.graph, cfg.pair_graph
    runners = {
        "onnxruntime": cfg,
        "shared": GraphGuidedUNet(plain_graph, combine_outside=True),
        "two-engines split": GraphGuidedUNet(guided_graph, pair_graph=plain_graph, pair_split=True),
        "guided graph only": GraphGuidedUNet(guided_graph),
    }
    for name, runner in runners.items():
        pair = runner.predict_pair(sample, timestep, embeds)
        assert pair.shape == ref.shape, name
        torch.testing.assert_close(pair, ref, rtol=0, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    w = torch.tensor([7.5, 3.0])
    u, c = ref.chunk(2)
    torch.testing.assert_close(cfg.predict_guided(sample, timestep, embeds, w), u + w.view(-1, 1, 1, 1) * (c - u),
                               rtol=0, atol=1e-3)


# ------------------------------------------------------------------ ONNX Runtime providers (pure decisions)
def test_onnxruntime_binds_on_the_provider_device_and_caches_tensorrt_engines(monkeypatch, tmp_path):
    from cfgswitch.runners.onnxruntime import binding_device, with_provider_defaults

    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path))
    assert binding_device(["CPUExecutionProvider"]) == torch.device("cpu")
    assert binding_device([("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]) == torch.device("cuda", 1)
    assert binding_device(["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == torch.device("cuda", 0)
    with pytest.raises(InvalidArgumentError, match=r"providers\[CUDAExecutionProvider\].device_id: expected a CUDA device"):
        binding_device([("CUDAExecutionProvider", {"device_id": "first"})])
    chosen = with_provider_defaults([("TensorrtExecutionProvider", {"trt_fp16_enable": "True"}), "CUDAExecutionProvider"],
                                    "sd15")
    name, opts = chosen[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] == "True"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path / "ort-tensorrt" / "sd15")
    assert chosen[1] == "CUDAExecutionProvider"
    mine = with_provider_defaults([("TensorrtExecutionProvider", {"trt_engine_cache_path": "/elsewhere"})])
    assert mine[0][1]["trt_engine_cache_path"] == "/elsewhere"  # the user's options win


# ------------------------------------------------------------------ Triton tensorrt_plan configs
def test_triton_tensorrt_configs_allocate_context_memory_on_profile_change(tiny_bundle, tmp_path):  # noqa: F811
    pytest.importorskip("tritonclient.grpc", reason="tritonclient parses the configs (the serve extra)")
    from cfgswitch.export.build import BuildOptions, BuildTarget, build_bundle
    from cfgswitch.serving.model_config import read_config
    from cfgswitch.serving.repo import RepoOptions, write_repository

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    build_bundle(copy, BuildOptions(layout="shared"), BuildTarget("10.13.0", "9.0", "placeholder GPU"),
                 lambda *a: b"placeholder plan: config-only", progress=False)
    written = write_repository(copy, tmp_path / "repo", RepoOptions(engines="tensorrt", layout="shared"))
    for model in ("text_encoder", "unet", "vae_decoder"):
        cfg = read_config(written[model])
        assert cfg.platform == "tensorrt_plan"
        assert cfg.parameters["execution_context_allocation_strategy"].string_value == "ON_PROFILE_CHANGE"
    assert len(read_config(written["unet"]).instance_group[0].profile) == 4  # one context per profile
