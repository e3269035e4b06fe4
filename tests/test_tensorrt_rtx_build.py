"""TensorRT plans built for real with TensorRT for RTX on a CPU (no GPU needed), then checked against io_specs.

Every engine of a tiny bundle and of the embedded model's bundle is built through
``cfgswitch build --trt tensorrt-rtx``, for both layouts and both dtypes. A plan cannot be
deserialised without a GPU (CUDA error 35), so each plan is checked through what TensorRT for
RTX gives on a CPU:

- the builder's own objects just before serialising, read back by ``cfgswitch build`` and kept
  in the manifest (``builder_report``): I/O tensor names, order and dtypes, the number of
  optimization profiles in the builder config, and every profile's min/opt/max
  (``IOptimizationProfile.get_shape``); compared here with :mod:`cfgswitch.io_specs` directly;
- the serialised plan: its size and sha256, the ``vtrt`` magic and the library version in its
  header, and the tensor names in its bytes.

Running the engines needs a GPU that TensorRT for RTX supports; that is not tested here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _bundle_fixtures import tiny_bundle, tiny_bundle_fp16  # noqa: F401  (fixtures)

from cfgswitch.cli import main
from cfgswitch.errors import BundleError
from cfgswitch.io_specs import graph_spec, plan_specs

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install 'cfgswitch[tensorrt-rtx]')")

LAYOUTS = ("two-engines", "shared")
EMBEDDED = Path(__file__).resolve().parents[1] / "engine" / "models" / "shapes"


def _build(bundle: Path, layout: str, *extra: str) -> dict:
    """``cfgswitch build BUNDLE --trt tensorrt-rtx --layout LAYOUT`` (its own plan checks on); the manifest's record."""
    rc = main(["build", str(bundle), "--trt", "tensorrt-rtx", "--layout", layout, "--no-progress", *extra])
    assert rc == 0, f"cfgswitch build failed with exit code {rc}"
    return json.loads((bundle / "manifest.json").read_text())["engines"][layout]


def _assert_plans_match_io_specs(bundle: Path, layout: str, entry: dict, static: bool = True, tf32: bool = True) -> None:
    """Each plan against io_specs, read independently of cfgswitch.export.plan_check."""
    from cfgswitch.bundle import read_manifest, sha256_file

    b = read_manifest(bundle)
    expected = {p.name: p for p in plan_specs(b.dims, b.batch_sizes, b.image_sizes, layout, static)}
    assert sorted(entry["plans"]) == sorted(expected)
    assert entry["tensorrt_flavour"] == "tensorrt-rtx" and entry["tensorrt_version"] == trt.__version__
    assert entry["compute_capability"] == "portable" and entry["build_flags"]["tf32"] is tf32
    header_version = ".".join(trt.__version__.split(".")[:3])
    for name, rec in entry["plans"].items():
        plan, spec = expected[name], graph_spec(expected[name].graph, b.dims)
        report = rec["builder_report"]
        inputs = [t for t in report["tensors"] if t["mode"] == "input"]
        outputs = [t for t in report["tensors"] if t["mode"] == "output"]
        assert [t["name"] for t in inputs] == spec.input_names and [t["name"] for t in outputs] == spec.output_names
        assert [t["dtype"] for t in inputs + outputs] == [t.resolved_dtype(b.dtype) for t in spec.inputs + spec.outputs]
        assert report["num_profiles"] == len(plan.profiles) == len(report["profiles"])
        for got, want in zip(report["profiles"], plan.profiles):
            assert got == {k: [list(s) for s in v] for k, v in want.shapes.items()}
        data = (bundle / rec["file"]).read_bytes()
        assert len(data) == rec["bytes"] > 1000 and sha256_file(bundle / rec["file"]) == rec["sha256"]
        assert data[:4] == b"vtrt" and f"{data[24]}.{data[25]}.{data[26]}" == header_version
        assert all(n.encode() in data for n in spec.input_names + spec.output_names)
        assert report["tf32"] is tf32 and (report["build_seconds"] > 0 or not rec["built_now"])


# ------------------------------------------------------------------ every engine of the tiny bundle
@pytest.fixture
def tiny_copy(tiny_bundle, tmp_path):  # noqa: F811
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_built(tiny_bundle, tmp_path_factory):  # noqa: F811
    """A copy of the tiny fp32 bundle with its two-engines plans built (once per module); tests copy it."""
    dst = tmp_path_factory.mktemp("tiny-built") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    _build(dst, "two-engines")
    return dst


def test_tiny_fp32_bundle_builds_every_engine(tiny_built):
    entry = json.loads((tiny_built / "manifest.json").read_text())["engines"]["two-engines"]
    _assert_plans_match_io_specs(tiny_built, "two-engines", entry)
    assert all(p["built_now"] for p in entry["plans"].values())


@pytest.mark.slow
def test_tiny_fp32_bundle_builds_every_engine_shared_layout(tiny_copy):
    entry = _build(tiny_copy, "shared")
    _assert_plans_match_io_specs(tiny_copy, "shared", entry)
    assert entry["plans"]["unet"]["builder_report"]["num_profiles"] == 4  # cfg 1, 3 (2B rows) then late 1, 3


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_fp16_bundle_builds_strongly_typed_fp16_engines(tiny_bundle_fp16, tmp_path, layout):  # noqa: F811
    bundle = tmp_path / "fp16"
    shutil.copytree(tiny_bundle_fp16, bundle)
    entry = _build(bundle, layout)
    _assert_plans_match_io_specs(bundle, layout, entry)
    unet = entry["plans"]["unet"]["builder_report"]
    assert {t["name"]: t["dtype"] for t in unet["tensors"]} == {
        "sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", "noise_pred": "float16"}


@pytest.mark.slow
def test_tiny_dynamic_profiles_and_tf32_off(tiny_copy):
    entry = _build(tiny_copy, "two-engines", "--dynamic", "--no-tf32")
    _assert_plans_match_io_specs(tiny_copy, "two-engines", entry, static=False, tf32=False)
    assert entry["static"] is False
    late = entry["plans"]["unet"]["builder_report"]["profiles"]
    assert late == [{"sample": [[1, 4, 8, 8], [3, 4, 8, 8], [3, 4, 8, 8]], "timestep": [[1], [3], [3]],
                     "encoder_hidden_states": [[1, 77, 32], [3, 77, 32], [3, 77, 32]]}]


@pytest.mark.slow
def test_row_buckets_give_the_plain_unet_one_static_profile_per_bucket(tiny_copy):
    entry = _build(tiny_copy, "two-engines", "--row-buckets", "1,2,4")
    assert entry["row_buckets"] == [1, 2, 4]
    late = entry["plans"]["unet"]["builder_report"]["profiles"]
    assert [p["sample"][0][0] for p in late] == [1, 2, 4]
    assert all(p["sample"][0] == p["sample"][1] == p["sample"][2] for p in late)  # static: min = opt = max
    cfg = entry["plans"]["unet_cfg"]["builder_report"]["profiles"]
    assert [p["sample"][0][0] for p in cfg] == [1, 3]  # the CFG engine keeps the bundle's batch sizes
    from cfgswitch.bundle import read_manifest
    from cfgswitch.export.plan_check import check_layout

    assert check_layout(read_manifest(tiny_copy), "two-engines")  # the checks read the buckets back


def test_bad_row_buckets_are_refused_before_any_build(tiny_copy, capsys):
    for bad in ("4,2", "0,1", "a,b"):
        assert main(["build", str(tiny_copy), "--trt", "tensorrt-rtx", "--row-buckets", bad, "--no-progress"]) == 2
        assert "--row-buckets: expected" in capsys.readouterr().err


# ------------------------------------------------------------------ every engine of the embedded model
@pytest.fixture(scope="module")
def embedded_bundles(tmp_path_factory):
    """The embedded model (engine/models/shapes) exported in fp32 and fp16, batch sizes 1 and 2."""
    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip(f"the embedded model is not in this checkout ({EMBEDDED.name}/model_index.json missing)")
    out = {}
    for dtype in ("fp32", "fp16"):
        path = tmp_path_factory.mktemp(f"shapes-{dtype}") / "bundle"
        assert main(["export", str(EMBEDDED), "--out", str(path), "--batch-sizes", "1,2", "--dtype", dtype,
                     "--no-progress"]) == 0
        out[dtype] = path
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_embedded_model_builds_every_engine(embedded_bundles, dtype, layout):
    bundle = embedded_bundles[dtype]
    entry = _build(bundle, layout)
    _assert_plans_match_io_specs(bundle, layout, entry)


# ------------------------------------------------------------------ the checks catch a wrong plan
def test_plan_built_with_a_wrong_profile_is_caught(tiny_built, tmp_path):
    from dataclasses import replace

    from cfgswitch.bundle import read_manifest
    from cfgswitch.export.build import BuildOptions, build_bundle, build_plan, detect_target
    from cfgswitch.export.plan_check import check_layout

    def wrong_builder(onnx_path, profiles, options, flavour):
        if onnx_path.name == "unet.onnx":  # the late role's batch-3 profile built for 2 rows
            p = profiles[-1]
            profiles = [*profiles[:-1], replace(p, shapes={k: tuple((2, *s[1:]) for s in v) for k, v in p.shapes.items()})]
        return build_plan(onnx_path, profiles, options, flavour)

    bundle = tmp_path / "b"
    shutil.copytree(tiny_built, bundle)
    check_layout(read_manifest(bundle), "two-engines")  # the right plans pass
    for plan in (bundle / "engines").glob("unet-*"):
        plan.unlink()  # only the late plan is rebuilt, wrongly; the others come from the cache
    build_bundle(bundle, BuildOptions(trt="tensorrt-rtx"), detect_target("tensorrt-rtx"), wrong_builder, progress=False)
    with pytest.raises(BundleError, match=r"two-engines plans do not match io_specs: plan unet: profile 1 input sample "
                                          r"min/opt/max \[\[2, 4, 8, 8\], \[2, 4, 8, 8\], \[2, 4, 8, 8\]\], "
                                          r"expected \[\[3, 4, 8, 8\], \[3, 4, 8, 8\], \[3, 4, 8, 8\]\]"):
        check_layout(read_manifest(bundle), "two-engines")


def test_tampered_plan_file_is_caught(tiny_built, tmp_path):
    from cfgswitch.export.plan_check import check_plan_file

    tiny_copy = tmp_path / "b"
    shutil.copytree(tiny_built, tiny_copy)
    entry = json.loads((tiny_copy / "manifest.json").read_text())["engines"]["two-engines"]
    path = tiny_copy / entry["plans"]["vae_decoder"]["file"]
    data = bytearray(path.read_bytes())
    assert check_plan_file(path, "tensorrt-rtx", trt.__version__, ["latents", "image"])["header_version"]
    data[25] = (data[25] + 1) % 256  # another minor version in the header
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"header says TensorRT for RTX 1\.\d+\.\d+, the manifest records"):
        check_plan_file(path, "tensorrt-rtx", trt.__version__, ["latents", "image"])
    assert main(["build", str(tiny_copy), "--trt", "tensorrt-rtx", "--no-progress"]) == 2  # the cached plan is refused


# ------------------------------------------------------------------ bad input
def test_graph_the_parser_rejects_names_graph_and_first_error(tiny_copy, capsys):
    import onnx
    from onnx import TensorProto, helper

    from cfgswitch.bundle import sha256_file

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["T", 77])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["T", 77, 32])
    node = helper.make_node("FancyEmbed", ["input_ids"], ["last_hidden_state"], name="fancy", domain="cfgswitch.test")
    model = helper.make_model(helper.make_graph([node], "text_encoder", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("cfgswitch.test", 1)])
    onnx.save(model, str(tiny_copy / "text_encoder.onnx"))
    m = json.loads((tiny_copy / "manifest.json").read_text())
    m["graphs"]["text_encoder"].update(sha256=sha256_file(tiny_copy / "text_encoder.onnx"),
                                       bytes=(tiny_copy / "text_encoder.onnx").stat().st_size)
    (tiny_copy / "manifest.json").write_text(json.dumps(m, indent=2))
    assert main(["build", str(tiny_copy), "--trt", "tensorrt-rtx", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "graph 'text_encoder' (text_encoder.onnx): TensorRT's ONNX parser rejected it: ErrorCode.INVALID_NODE:" in err
    assert "(node 0 'fancy', FancyEmbed)" in err and "Traceback" not in err
    assert not list((tiny_copy / "engines").glob("*.plan"))


def test_interrupted_build_leaves_nothing_in_the_cache(tiny_copy):
    """The real builder killed (SIGKILL) while it builds: no plan, no temporary, no report, no manifest record."""
    engines = tiny_copy / "engines"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cfgswitch", "build", str(tiny_copy), "--trt", "tensorrt-rtx",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(engines.glob("*.lock")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        assert list(engines.glob("*.lock")), "the build never took a plan lock"
        os.kill(proc.pid, signal.SIGKILL)  # inside the first plan's build, under its lock
    finally:
        proc.wait(timeout=60)
    assert not [p.name for p in engines.iterdir() if p.suffix in (".plan", ".tmp") or p.name.endswith(".json")]
    assert json.loads((tiny_copy / "manifest.json").read_text())["engines"] == {}


@pytest.mark.slow
def test_compute_capability_targets_are_built_and_recorded(tiny_copy, capsys):
    """The porting guide: an ahead-of-time plan can target chosen GPUs; Turing (7.5, not in TensorRT for RTX's
    default set) has no FP32 GEMM, so an fp32 bundle is refused for it with TensorRT's own first error."""
    entry = _build(tiny_copy, "two-engines", "--compute-capability", "8.6,8.9")
    assert entry["compute_capability"] == "8.6,8.9"
    _assert_plans_match_io_specs(tiny_copy, "two-engines", {**entry, "compute_capability": "portable"})
    assert main(["build", str(tiny_copy), "--trt", "tensorrt-rtx", "--compute-capability", "7.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "graph 'text_encoder': TensorRT (tensorrt-rtx) built no engine:" in err
    assert "for Turing (SM75): FP32 GEMM is not supported" in err and "Traceback" not in err


# ------------------------------------------------------------------ loading RTX plans on a machine without a GPU
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the choice a machine without CUDA makes")
def test_rtx_plans_on_a_cpu_machine(tiny_built, caplog):
    import logging

    from cfgswitch import Sampler
    from cfgswitch.errors import BackendUnavailableError

    with caplog.at_level(logging.INFO, logger="cfgswitch.bundle_loading"):
        s = Sampler.load(tiny_built)  # tensorrt_rtx imports here, but no GPU: a CPU backend is picked, and why is logged
    from cfgswitch.backends.registry import importable

    assert s.backend == ("openvino" if importable("openvino") else "onnxruntime")
    assert "the bundle has TensorRT plans but no CUDA GPU is visible for tensorrt" in caplog.text
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' needs a CUDA GPU visible to torch; none is"):
        Sampler.load(tiny_built, backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="running TensorRT for RTX plans needs a CUDA GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rtx_plans_run_and_match_onnxruntime(tiny_copy, layout):
    """Where a GPU is: the CPU-built plans run through the TensorRT backend and match ONNX Runtime (TF32, tactics)."""
    import numpy as np

    from cfgswitch import Sampler

    _build(tiny_copy, layout)
    trt_s = Sampler.load(tiny_copy, backend="tensorrt", layout=layout, cuda_graphs=True)
    ort_s = Sampler.load(tiny_copy, backend="onnxruntime")
    assert trt_s.runners.info["tensorrt_flavour"] == "tensorrt-rtx"
    for plan in ("always", "switch:0.5", "adaptive:0.5"):
        a = trt_s.generate(["a fox", "b", "c"], steps=6, plan=plan, output_type="np").images
        b = ort_s.generate(["a fox", "b", "c"], steps=6, plan=plan, output_type="np").images
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2)
