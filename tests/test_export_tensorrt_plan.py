"""What TensorRT is asked to do, tested without TensorRT: profiles, plans, cache keys, locks, manifest checks."""

from __future__ import annotations

import importlib.util
import json
import threading

import pytest
from _bundle_fixtures import bundle_copy, tiny_bundle  # noqa: F401  (fixtures)

from cfgswitch.cli import main
from cfgswitch.errors import BundleError, EngineMismatchError, InvalidArgumentError
from cfgswitch.io_specs import ModelSpec, plan_specs, profiles_for, select_profile

SD = ModelSpec(latent_channels=4, vae_scale_factor=8, text_length=77, text_width=768)


# ------------------------------------------------------------------ profiles per role and layout
def test_static_profiles_two_engines_cfg_role():
    profs = profiles_for("cfg", SD, [1, 2, 4], [(512, 512)], "two-engines", static=True)
    assert [p.batch for p in profs] == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    p4 = profs[2].shapes
    assert set(p4) == {"sample", "timestep", "encoder_hidden_states", "guidance_scale"}
    assert p4["sample"] == ((4, 4, 64, 64),) * 3
    assert p4["encoder_hidden_states"] == ((8, 77, 768),) * 3  # the guided graph takes [uncond; cond]
    assert p4["timestep"] == ((4,),) * 3 and p4["guidance_scale"] == ((4,),) * 3


def test_static_profiles_shared_layout_run_plain_unet_on_2b_rows():
    cfg = profiles_for("cfg", SD, [2], [(512, 768)], "shared", static=True)[0].shapes
    late = profiles_for("late", SD, [2], [(512, 768)], "shared", static=True)[0].shapes
    assert set(cfg) == set(late) == {"sample", "timestep", "encoder_hidden_states"}
    assert cfg["sample"][0] == (4, 4, 64, 96) and cfg["encoder_hidden_states"][0] == (4, 77, 768)
    assert late["sample"][0] == (2, 4, 64, 96) and late["encoder_hidden_states"][0] == (2, 77, 768)


def test_dynamic_profile_spans_batches_and_sizes():
    (p,) = profiles_for("late", SD, [1, 2, 4], [(512, 512), (768, 512)], "two-engines", static=False)
    assert p.batch == (1, 4, 4)
    assert p.shapes["sample"] == ((1, 4, 64, 64), (4, 4, 64, 64), (4, 4, 96, 64))
    for static in (True, False):  # prompts per call can be fewer than images: always 1..max rows
        (te,) = profiles_for("text_encoder", SD, [2, 4], [(512, 512)], static=static)
        assert te.shapes["input_ids"] == ((1, 77), (4, 77), (4, 77))
    (vae,) = profiles_for("vae_decoder", SD, [2, 4], [(512, 512)], static=True)[:1]
    assert vae.shapes["latents"][0] == (2, 4, 64, 64)


def test_plan_specs_per_layout():
    two = plan_specs(SD, [1, 2], [(512, 512)], "two-engines")
    assert [(p.name, p.graph) for p in two] == [("text_encoder", "text_encoder"), ("unet_cfg", "unet_cfg"),
                                                 ("unet", "unet"), ("vae_decoder", "vae_decoder")]
    shared = plan_specs(SD, [1, 2], [(512, 512)], "shared")
    assert [p.name for p in shared] == ["text_encoder", "unet", "vae_decoder"]
    unet = shared[1]
    assert unet.profile_indices("cfg") == [0, 1] and unet.profile_indices("late") == [2, 3]
    assert unet.profiles[1].shapes["sample"][0] == (4, 4, 64, 64)  # cfg, B=2: 4 rows
    assert unet.profiles[3].shapes["sample"][0] == (2, 4, 64, 64)  # late, B=2: 2 rows
    with pytest.raises(KeyError, match="layout"):
        plan_specs(SD, [1], [(512, 512)], "three-engines")


def test_select_profile_prefers_exact_static_and_refuses_uncovered():
    profs = plan_specs(SD, [1, 2, 4], [(512, 512)], "shared")[1].profiles
    assert select_profile(profs, "late", 2, 512, 512) == 4  # 3 cfg profiles, then late 1, 2, 4
    assert select_profile(profs, "cfg", 4, 512, 512) == 2
    assert select_profile(profs, "late", 3, 512, 512) is None
    assert select_profile(profs, "late", 2, 768, 512) is None


def test_polygraphy_profiles_carry_the_shapes():
    pytest.importorskip("polygraphy")
    from cfgswitch.export.build import polygraphy_profiles

    (pg,) = polygraphy_profiles(profiles_for("cfg", SD, [2], [(512, 512)], static=True))
    assert list(pg.keys()) == ["sample", "timestep", "encoder_hidden_states", "guidance_scale"]
    assert tuple(pg["encoder_hidden_states"].min) == (4, 77, 768) == tuple(pg["encoder_hidden_states"].max)


# ------------------------------------------------------------------ cache key, atomic write, lock
def test_cache_key_changes_with_every_input():
    from cfgswitch.export.cache import plan_cache_key

    profs = profiles_for("late", SD, [1], [(512, 512)])
    base = plan_cache_key("aa", profs, "10.3.0", "9.0", {"static": True})
    assert base == plan_cache_key("aa", profs, "10.3.0", "9.0", {"static": True}) and len(base) == 64
    variants = [
        plan_cache_key("ab", profs, "10.3.0", "9.0", {"static": True}),
        plan_cache_key("aa", profiles_for("late", SD, [2], [(512, 512)]), "10.3.0", "9.0", {"static": True}),
        plan_cache_key("aa", profs, "11.0.0", "9.0", {"static": True}),
        plan_cache_key("aa", profs, "10.3.0", "8.9", {"static": True}),
        plan_cache_key("aa", profs, "10.3.0", "9.0", {"static": False}),
    ]
    assert len({base, *variants}) == 6


def test_atomic_write_leaves_no_temporary(tmp_path):
    from cfgswitch.export.cache import atomic_write_bytes

    p = atomic_write_bytes(tmp_path / "sub" / "x.plan", b"abc")
    assert p.read_bytes() == b"abc" and [f.name for f in p.parent.iterdir()] == ["x.plan"]


def test_failed_build_leaves_no_plan(tmp_path):
    from cfgswitch.export.cache import PlanCache

    cache = PlanCache(tmp_path)

    def crash():
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache.get_or_build("unet", "k" * 64, crash)
    assert cache.get("unet", "k" * 64) is None
    assert not [f for f in tmp_path.iterdir() if f.suffix in (".plan", ".tmp")]


def test_concurrent_builders_of_one_key_build_once(tmp_path):
    import time

    from cfgswitch.export.cache import PlanCache

    calls = []

    def build():
        calls.append(1)
        time.sleep(0.3)  # the second builder arrives while this one holds the lock
        return b"PLAN"

    results = []
    threads = [threading.Thread(target=lambda: results.append(PlanCache(tmp_path).get_or_build("unet", "f" * 64, build)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(built for _, built, _ in results) == [False, True]
    assert results[0][0] == results[1][0] and results[0][0].read_bytes() == b"PLAN"


# ------------------------------------------------------------------ build orchestration (TensorRT replaced by a byte builder)
def _fake_target(version="10.7.0", cc="9.0"):
    from cfgswitch.export.build import BuildTarget

    return BuildTarget(version, cc, "NVIDIA H100")


def test_build_records_plans_roles_and_uses_cache(bundle_copy):  # noqa: F811
    from cfgswitch.bundle import read_manifest, sha256_file
    from cfgswitch.bundle_loading import has_tensorrt_plans, pick_backend
    from cfgswitch.export.build import BuildOptions, build_bundle

    asked = []

    def builder(onnx_path, profiles, options, flavour):
        asked.append((onnx_path.name, [p.batch for p in profiles], options.builder_optimization_level))
        assert flavour.name == "tensorrt"
        return f"plan of {onnx_path.name}".encode()

    entry = build_bundle(bundle_copy, BuildOptions(builder_optimization_level=2), _fake_target(), builder, progress=False)
    assert sorted(asked) == [("text_encoder.onnx", [(1, 3, 3)], 2), ("unet.onnx", [(1, 1, 1), (3, 3, 3)], 2),
                             ("unet_cfg.onnx", [(1, 1, 1), (3, 3, 3)], 2), ("vae_decoder.onnx", [(1, 1, 1), (3, 3, 3)], 2)]
    m = read_manifest(bundle_copy).manifest
    rec = m["engines"]["two-engines"]
    assert rec == entry and rec["tensorrt_version"] == "10.7.0" and rec["compute_capability"] == "9.0"
    assert rec["tensorrt_flavour"] == "tensorrt" and rec["build_flags"]["tf32"] is True
    assert rec["roles"]["cfg"] == {"plan": "unet_cfg", "profiles": [0, 1], "combine_outside": False}
    assert rec["roles"]["late"]["plan"] == "unet"
    plan = rec["plans"]["unet_cfg"]
    assert plan["file"].startswith("engines/unet_cfg-") and plan["onnx_sha256"] == m["graphs"]["unet_cfg"]["sha256"]
    assert plan["sha256"] == sha256_file(bundle_copy / plan["file"])
    b = read_manifest(bundle_copy)
    assert has_tensorrt_plans(b)
    assert pick_backend(b, importable=lambda m: True, cuda=lambda: True)[0] == "tensorrt"
    assert pick_backend(b, importable=lambda m: m == "onnxruntime", cuda=lambda: True) == (
        "onnxruntime", "the bundle has TensorRT plans but tensorrt does not import; openvino does not import")
    assert pick_backend(b, importable=lambda m: True, cuda=lambda: False) == (
        "openvino", "the bundle has TensorRT plans but no CUDA GPU is visible for tensorrt")
    # Same inputs: every plan comes from the cache; another TensorRT version: new keys, new plans.
    asked.clear()
    again = build_bundle(bundle_copy, BuildOptions(builder_optimization_level=2), _fake_target(), builder, progress=False)
    assert asked == [] and not any(p["built_now"] for p in again["plans"].values())
    build_bundle(bundle_copy, BuildOptions(builder_optimization_level=2), _fake_target("10.8.0"), builder, progress=False)
    assert len(asked) == 4


def test_shared_layout_build_records_one_unet_plan(bundle_copy):  # noqa: F811
    from cfgswitch.export.build import BuildOptions, build_bundle

    entry = build_bundle(bundle_copy, BuildOptions(layout="shared", static=False), _fake_target(),
                         lambda *a: b"x", progress=False)
    assert sorted(entry["plans"]) == ["text_encoder", "unet", "vae_decoder"]
    assert entry["roles"]["cfg"] == {"plan": "unet", "profiles": [0], "combine_outside": True}
    assert entry["roles"]["late"] == {"plan": "unet", "profiles": [1], "combine_outside": False}
    cfg_prof = entry["plans"]["unet"]["profiles"][0]
    assert cfg_prof["shapes"]["sample"] == [[2, 4, 8, 8], [6, 4, 8, 8], [6, 4, 8, 8]]  # 2B rows, B in 1..3


def test_build_refuses_a_tampered_graph(bundle_copy):  # noqa: F811
    from cfgswitch.export.build import BuildOptions, build_bundle

    (bundle_copy / "unet.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="unet.onnx has 7 bytes"):
        build_bundle(bundle_copy, BuildOptions(), _fake_target(), lambda *a: b"x", progress=False)


# ------------------------------------------------------------------ runtime decisions
def _entry(bundle_path):
    from cfgswitch.export.build import BuildOptions, build_bundle

    return build_bundle(bundle_path, BuildOptions(), _fake_target(), lambda *a: b"x", progress=False)


def test_plans_of_another_tensorrt_or_gpu_are_refused(bundle_copy):  # noqa: F811
    from cfgswitch.runners.tensorrt import check_engine_compat

    entry = _entry(bundle_copy)
    check_engine_compat(entry, bundle_copy, "two-engines", "10.7.0", "9.0")  # the same: accepted
    with pytest.raises(EngineMismatchError, match=r"built by TensorRT 10.7.0, this process runs TensorRT 11.0.1.*"
                                                  r"Rebuild with: cfgswitch build .* --layout two-engines"):
        check_engine_compat(entry, bundle_copy, "two-engines", "11.0.1", "9.0")
    with pytest.raises(EngineMismatchError, match=r"compute capability 9.0 \(NVIDIA H100\), this GPU has 8.9.*cfgswitch build"):
        check_engine_compat(entry, bundle_copy, "two-engines", "10.7.0", "8.9")


def test_choose_layout(bundle_copy):  # noqa: F811
    from cfgswitch.runners.tensorrt import choose_layout

    with pytest.raises(BundleError, match=r"no TensorRT plans .* cfgswitch build .* --layout two-engines"):
        choose_layout({}, bundle_copy)
    engines = {"shared": {"plans": {"unet": {}}}}
    assert choose_layout(engines, bundle_copy) == "shared"
    with pytest.raises(BundleError, match="--layout two-engines"):
        choose_layout(engines, bundle_copy, "two-engines")
    with pytest.raises(InvalidArgumentError, match="layout"):
        choose_layout(engines, bundle_copy, "one")


def test_request_outside_static_plans_names_flags(bundle_copy):  # noqa: F811
    from cfgswitch.runners.tensorrt import check_engine_request

    entry = _entry(bundle_copy)
    check_engine_request(entry, "b", "two-engines", 3, 16, 16)
    with pytest.raises(BundleError, match=r"batch 2 at 16x16 is not covered .*batches \[1, 3\].*--batch-sizes.*--dynamic"):
        check_engine_request(entry, "b", "two-engines", 2, 16, 16)
    with pytest.raises(BundleError, match="not covered"):
        check_engine_request(entry, "b", "two-engines", 1, 32, 32)


def test_split_rows():
    from cfgswitch.runners.tensorrt import split_rows

    assert split_rows(6, [1, 3]) == [3, 3]  # the adaptive plan's 2B rows on B-row late plans
    assert split_rows(5, [1, 3]) == [3, 1, 1]
    assert split_rows(5, [2, 4]) is None


# ------------------------------------------------------------------ CLI and the real thing
def test_build_cli_errors(tiny_bundle, tmp_path, capsys):  # noqa: F811
    assert main(["build", str(tiny_bundle), "--builder-optimization-level", "7"]) == 2
    assert "--builder-optimization-level: expected an integer in [0, 5]" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "none")]) == 2
    assert "no such path" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_names_gpu_extra(bundle_copy, capsys):  # noqa: F811
    assert main(["build", str(bundle_copy), "--trt", "tensorrt", "--no-progress"]) == 2
    assert "pip install 'cfgswitch[gpu]'" in capsys.readouterr().err
    assert json.loads((bundle_copy / "manifest.json").read_text())["engines"] == {}


def _tensorrt_and_cuda() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.tensorrt
@pytest.mark.skipif(not _tensorrt_and_cuda(), reason="needs TensorRT and a CUDA GPU (neither is on CPU CI machines)")
@pytest.mark.parametrize("layout", ["two-engines", "shared"])
def test_tensorrt_generate_matches_onnxruntime(bundle_copy, layout):  # noqa: F811
    import numpy as np

    from cfgswitch import Sampler
    from cfgswitch.export.build import BuildOptions, build_bundle

    build_bundle(bundle_copy, BuildOptions(layout=layout), progress=False)
    trt_s = Sampler.load(bundle_copy, backend="tensorrt", layout=layout, cuda_graphs=True)
    ort_s = Sampler.load(bundle_copy, backend="onnxruntime")
    for plan in ("always", "switch:0.5", "adaptive:0.5"):
        a = trt_s.generate(["a fox", "b", "c"], steps=6, plan=plan, output_type="np").images
        b = ort_s.generate(["a fox", "b", "c"], steps=6, plan=plan, output_type="np").images
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2)  # TF32 / tactic differences on the GPU


# ------------------------------------------------------------------ issue 13: flavour, TF32, external data
def test_cache_key_covers_flavour_tf32_and_external_data():
    from cfgswitch.export.cache import plan_cache_key

    profs = profiles_for("late", SD, [1], [(512, 512)])
    base = plan_cache_key("aa", profs, "1.7.1.116", "portable", {"tf32": True})
    variants = [
        plan_cache_key("aa", profs, "1.7.1.116", "portable", {"tf32": False}),
        plan_cache_key("aa", profs, "1.7.1.116", "portable", {"tf32": True}, external_data_sha256="d1"),
        plan_cache_key("aa", profs, "1.7.1.116", "portable", {"tf32": True}, flavour="tensorrt-rtx"),
    ]
    assert len({base, *variants}) == 4
    assert plan_cache_key("aa", profs, "1.7.1.116", "portable", {"tf32": True}, external_data_sha256="d2") != variants[1]


def test_build_options_refuse_unknown_trt_and_default_tf32_on():
    from cfgswitch.export.build import BuildOptions

    assert BuildOptions().flags()["tf32"] is True
    assert BuildOptions(tf32=False).flags()["tf32"] is False
    with pytest.raises(InvalidArgumentError, match=r"--trt: expected one of tensorrt, tensorrt-rtx, auto, got 'rtx'"):
        BuildOptions(trt="rtx").check()


def test_unknown_trt_on_the_command_line(tiny_bundle, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before any work
        main(["build", str(tiny_bundle), "--trt", "tensorrt-11"])
    assert exit_info.value.code == 2
    assert "argument --trt: invalid choice: 'tensorrt-11' (choose from 'tensorrt', 'tensorrt-rtx', 'auto')" in capsys.readouterr().err


def _external_data_unet(bundle, scale):
    """Re-save ``unet.onnx`` with its weights in ``unet.onnx.data`` (scaled by ``scale``), and record both in the manifest."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from cfgswitch.bundle import sha256_file

    model = onnx.load(str(bundle / "unet.onnx"))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 256:
            init.CopyFrom(numpy_helper.from_array((arr * scale).astype(np.float32), init.name))
    onnx.save_model(model, str(bundle / "unet.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet.onnx.data", size_threshold=1024)
    m = json.loads((bundle / "manifest.json").read_text())
    g = m["graphs"]["unet"]
    g["sha256"], g["bytes"] = sha256_file(bundle / "unet.onnx"), (bundle / "unet.onnx").stat().st_size
    g["external_data"] = {"file": "unet.onnx.data", "sha256": sha256_file(bundle / "unet.onnx.data"),
                          "bytes": (bundle / "unet.onnx.data").stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    return g


def test_cache_key_tells_apart_graphs_that_differ_only_in_external_data(tiny_bundle, tmp_path):  # noqa: F811
    """A base model and a fine-tune: identical ``unet.onnx``, different ``unet.onnx.data``, so different plans."""
    import shutil

    from cfgswitch.export.build import BuildOptions, build_bundle

    keys = []
    for i, scale in enumerate((1.0, 1.5)):
        b = tmp_path / f"b{i}"
        shutil.copytree(tiny_bundle, b)
        keys.append(_external_data_unet(b, scale))
    assert keys[0]["sha256"] == keys[1]["sha256"]  # the .onnx files are byte-identical
    assert keys[0]["external_data"]["sha256"] != keys[1]["external_data"]["sha256"]
    shared_cache = tmp_path / "cache"  # one cache for both, as a host serving a base and a fine-tune would
    entries = [build_bundle(tmp_path / f"b{i}", BuildOptions(cache_dir=shared_cache), _fake_target(), lambda *a: b"x",
                            progress=False) for i in range(2)]
    a, b = (e["plans"]["unet"] for e in entries)
    assert a["cache_key"] != b["cache_key"] and b["built_now"]
    assert a["external_data_sha256"] == keys[0]["external_data"]["sha256"]
    assert entries[0]["plans"]["text_encoder"]["cache_key"] == entries[1]["plans"]["text_encoder"]["cache_key"]
    from cfgswitch.bundle import read_manifest

    for i in range(2):  # plans of a cache outside the bundle are placed inside it: the bundle stays sealed
        b = read_manifest(tmp_path / f"b{i}")
        assert all(p["file"].startswith("engines/") and (b.path / p["file"]).is_file()
                   for p in b.engines("two-engines")["plans"].values())


def test_plans_of_another_flavour_are_refused_with_the_rebuild_command(bundle_copy):  # noqa: F811
    from cfgswitch.export.build import BuildOptions, BuildTarget, build_bundle
    from cfgswitch.runners.tensorrt import check_engine_compat

    rtx = BuildTarget("1.7.1.116", "portable", "none (ahead-of-time build)", "tensorrt-rtx")
    entry = build_bundle(bundle_copy, BuildOptions(), rtx, lambda *a: b"x", progress=False)
    assert entry["tensorrt_flavour"] == "tensorrt-rtx" and entry["compute_capability"] == "portable"
    check_engine_compat(entry, bundle_copy, "two-engines", "1.7.1.116", "8.6", "tensorrt-rtx")  # portable: any GPU
    # The rebuild command names the TensorRT this process runs.
    with pytest.raises(EngineMismatchError, match=r"built by tensorrt-rtx 1.7.1.116, this process runs tensorrt 10.7.0.*"
                                                  r"Rebuild with: cfgswitch build .* --layout two-engines$"):
        check_engine_compat(entry, bundle_copy, "two-engines", "10.7.0", "8.6", "tensorrt")
    with pytest.raises(EngineMismatchError, match=r"TensorRT for RTX 1.7.1.116, this process runs TensorRT for RTX 1.8.0"):
        check_engine_compat(entry, bundle_copy, "two-engines", "1.8.0", "8.6", "tensorrt-rtx")
    full = _entry(bundle_copy)  # no flavour recorded by older builds means full TensorRT
    full.pop("tensorrt_flavour")
    with pytest.raises(EngineMismatchError, match=r"built by tensorrt 10.7.0, this process runs tensorrt-rtx.*"
                                                  r"--layout two-engines --trt tensorrt-rtx$"):
        check_engine_compat(full, bundle_copy, "two-engines", "1.7.1.116", "9.0", "tensorrt-rtx")


def test_resolve_flavour():
    from cfgswitch.backends.trt_flavour import FLAVOURS, resolve_flavour

    assert resolve_flavour("tensorrt-rtx") is FLAVOURS["tensorrt-rtx"]
    with pytest.raises(InvalidArgumentError, match="--trt"):
        resolve_flavour("trt")
    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is not None:
        assert resolve_flavour("auto").name == "tensorrt-rtx"


def test_compute_capability_targets_are_recorded_and_checked(bundle_copy):  # noqa: F811
    from cfgswitch.export.build import BuildOptions, BuildTarget, build_bundle
    from cfgswitch.runners.tensorrt import check_engine_compat

    with pytest.raises(InvalidArgumentError, match=r"--compute-capability: expected TensorRT for RTX targets among 7.5, 8.0"):
        BuildOptions(trt="tensorrt-rtx", compute_capabilities=("9.0",)).check()
    with pytest.raises(InvalidArgumentError, match="--compute-capability"):
        BuildOptions(trt="tensorrt", compute_capabilities=("8.6",)).check()
    target = BuildTarget("1.7.1.116", "7.5,8.6", "none (ahead-of-time build)", "tensorrt-rtx")
    entry = build_bundle(bundle_copy, BuildOptions(trt="tensorrt-rtx", compute_capabilities=("7.5", "8.6")), target,
                         lambda *a: b"x", progress=False)
    assert entry["compute_capability"] == "7.5,8.6"
    check_engine_compat(entry, bundle_copy, "two-engines", "1.7.1.116", "7.5", "tensorrt-rtx")
    with pytest.raises(EngineMismatchError, match=r"compute capability 7.5,8.6 .*this GPU has 8.9.*--trt tensorrt-rtx"):
        check_engine_compat(entry, bundle_copy, "two-engines", "1.7.1.116", "8.9", "tensorrt-rtx")
