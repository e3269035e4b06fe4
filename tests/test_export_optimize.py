"""``cfgswitch export --optimize``: ONNX Runtime's CPU-safe fused graphs beside a bundle's reference graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _bundle_fixtures import tiny_bundle  # noqa: F401  (fixture)

from cfgswitch.bundle import read_manifest, sha256_file, verify_graphs
from cfgswitch.cli import main
from cfgswitch.errors import InvalidArgumentError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: Operators that have CUDA kernels only: none may appear in a CPU-safe fused graph.
CUDA_ONLY_OPS = {"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "PackedAttention",
                 "PackedMultiHeadAttention"}


@pytest.fixture(scope="module")
def optimized_bundle(tiny_bundle, tmp_path_factory):  # noqa: F811
    """A copy of the tiny fp32 bundle run through ``cfgswitch export --optimize-only``."""
    dst = tmp_path_factory.mktemp("optimized") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    assert main(["export", "--optimize-only", str(dst), "--threads", "1"]) == 0
    return dst


def _session(path: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _inputs(name: str, rng):
    """The test's own inputs (2 images, 16 px: 2x2 latents), independent of the optimizer's check."""
    if name == "text_encoder":
        return {"input_ids": np.array([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70] * 2, dtype=np.int64)}
    if name == "vae_decoder":
        return {"latents": rng.standard_normal((2, 4, 2, 2)).astype(np.float32)}
    feeds = {"sample": rng.standard_normal((2, 4, 2, 2)).astype(np.float32),
             "timestep": np.array([981.0, 21.0], dtype=np.float32)}
    if name == "unet_cfg":
        feeds["encoder_hidden_states"] = rng.standard_normal((4, 77, 32)).astype(np.float32)
        feeds["guidance_scale"] = np.array([7.5, 3.0], dtype=np.float32)
    else:
        feeds["encoder_hidden_states"] = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet_cfg", "vae_decoder"])
def test_fused_graphs_load_on_cpu_and_match_the_reference(optimized_bundle, tiny_bundle, name):  # noqa: F811
    manifest = json.loads((optimized_bundle / "manifest.json").read_text())
    rec = manifest["graphs"][name]["ort_optimized"]
    fused_file = optimized_bundle / rec["file"]
    assert rec["file"] == f"ort/{name}.onnx" and sha256_file(fused_file) == rec["sha256"]
    assert rec["bytes"] == fused_file.stat().st_size
    # the reference graph is untouched
    ref_entry = manifest["graphs"][name]
    assert sha256_file(optimized_bundle / ref_entry["file"]) == sha256_file(tiny_bundle / ref_entry["file"])
    ops = {n.op_type for n in onnx.load(str(fused_file)).graph.node}
    assert not ops & CUDA_ONLY_OPS
    assert set(rec["fusions"]) <= ops  # what the manifest says was fused is in the graph
    feeds = _inputs(name, np.random.default_rng(7))
    ref = _session(optimized_bundle / ref_entry["file"]).run(None, feeds)
    new = _session(fused_file).run(None, feeds)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, new))
    assert diff <= 1e-4, f"{name}: fused graph differs by {diff}"
    assert rec["check"]["ok"] and rec["check"]["max_abs_diff"] <= 1e-4


def test_manifest_records_the_fusions_and_options(optimized_bundle):
    manifest = json.loads((optimized_bundle / "manifest.json").read_text())
    for name in ("unet", "unet_cfg"):
        fusions = manifest["graphs"][name]["ort_optimized"]["fusions"]
        assert {"MultiHeadAttention", "SkipLayerNormalization"} <= set(fusions)
    assert "SkipLayerNormalization" in manifest["graphs"]["text_encoder"]["ort_optimized"]["fusions"]
    note = manifest["ort_optimized"]
    assert note["opt_level"] == 0 and note["use_gpu"] is False and note["onnxruntime"] == ort.__version__
    assert {"enable_nhwc_conv", "enable_packed_qkv", "enable_group_norm"} <= set(note["disabled_fusions"])
    assert note["model_types"] == {"text_encoder": "clip", "unet": "unet", "unet_cfg": "unet", "vae_decoder": "vae"}
    verify_graphs(read_manifest(optimized_bundle))  # the bundle still checks out
    # The fused UNet graphs keep the weights once, in one file of ort/, as the reference graphs do.
    unet, cfg = (manifest["graphs"][g]["ort_optimized"]["external_data"] for g in ("unet", "unet_cfg"))
    assert unet == cfg and unet["file"] == "ort/unet_weights.onnx.data"
    assert sorted(p.name for p in (optimized_bundle / "ort").glob("*.data")) == ["unet_weights.onnx.data"]


def test_optimized_bundle_generates_like_the_original(optimized_bundle, tiny_bundle):  # noqa: F811
    from cfgswitch import Sampler

    kw = dict(steps=2, seed=0, output_type="np", plan="switch:0.5")
    a = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1).generate(["a red circle"], **kw).images
    b = Sampler.load(optimized_bundle, backend="onnxruntime", threads=1).generate(["a red circle"], **kw).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4


def test_optimize_again_needs_overwrite(optimized_bundle):
    from cfgswitch.export.optimize import optimize_bundle

    with pytest.raises(InvalidArgumentError) as e:
        optimize_bundle(optimized_bundle, graphs=["vae_decoder"])
    assert e.value.argument == "overwrite"
    with pytest.raises(InvalidArgumentError) as e:
        optimize_bundle(optimized_bundle, graphs=["unet_xl"])
    assert e.value.argument == "graphs"


def test_cli_optimize_only_refuses_model_and_out(tmp_path, capsys):
    assert main(["export", "default", "--optimize-only", str(tmp_path)]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err
    assert main(["export", "--optimize-only", str(tmp_path / "missing")]) == 2
    assert "--optimize-only" in capsys.readouterr().err


class _Killed(BaseException):
    """Stands for a kill arriving between the fused files and the manifest."""


@pytest.mark.parametrize("first", [False, True], ids=["fresh", "re-optimize"])
def test_killed_optimize_leaves_a_bundle_that_loads(tiny_bundle, tmp_path, monkeypatch, first):  # noqa: F811
    from cfgswitch import Sampler
    from cfgswitch.export import optimize

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    if first:
        optimize.optimize_bundle(bundle, graphs=["vae_decoder"], check=False)
    before = (bundle / "manifest.json").read_text()
    seen = {}
    real_write = optimize.write_json_atomic

    def killed_at_final_manifest(path, data):
        if "ort_optimized" in data:  # the last write: the new records
            seen["files"] = {p.name: p.stat().st_size for p in (bundle / "ort").iterdir()}
            raise _Killed()
        real_write(path, data)

    monkeypatch.setattr(optimize, "write_json_atomic", killed_at_final_manifest)
    with pytest.raises(_Killed):
        optimize.optimize_bundle(bundle, graphs=["vae_decoder"], overwrite=True, check=False)
    assert seen["files"].get("vae_decoder.onnx", 0) > 0  # the fused file was complete when it died
    if not first:
        assert (bundle / "manifest.json").read_text() == before  # untouched
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert not any(e.get("ort_optimized") for e in manifest["graphs"].values())
    assert "ort_optimized" not in manifest
    verify_graphs(read_manifest(bundle))
    out = Sampler.load(bundle, backend="onnxruntime", threads=1).generate(["a red circle"], steps=1, seed=0,
                                                                          output_type="np")
    assert np.isfinite(np.asarray(out.images)).all()
