"""The UNet weights once: one external-data file for unet.onnx and unet_cfg.onnx, one map of it in ONNX Runtime,
and ONNX Runtime's optimized graphs cached in the cfgswitch cache folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _bundle_fixtures import bundle_copy, tiny_bundle  # noqa: F401  (fixtures)

from cfgswitch import Sampler
from cfgswitch.bundle import read_manifest, sha256_file
from cfgswitch.errors import BundleError

ort = pytest.importorskip("onnxruntime")

# Same weights, same loop; only kernel order differs (the ONNX Runtime backend's tolerance).
IMAGE_TOL = 1e-3
KWARGS = dict(steps=4, guidance_scale=7.5, plan="switch:0.5", seed=7, output_type="np")


def _external_locations(path: Path):
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def _unet_weight_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=True)
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_unet_graphs_name_one_external_file_holding_the_weights_once(tiny_bundle):  # noqa: F811
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    unet, cfg = manifest["graphs"]["unet"], manifest["graphs"]["unet_cfg"]
    assert unet["external_data"] == cfg["external_data"]
    shared = tiny_bundle / unet["external_data"]["file"]
    assert _external_locations(tiny_bundle / "unet.onnx") == _external_locations(tiny_bundle / "unet_cfg.onnx") == {shared.name}
    assert sorted(f.name for f in tiny_bundle.glob("*.data")) == [shared.name]
    assert unet["external_data"]["sha256"] == sha256_file(shared)
    assert unet["external_data"]["bytes"] == shared.stat().st_size
    # Stored once: about one UNet's weights (alignment padding aside), not two.
    one_unet = _unet_weight_bytes(tiny_bundle / "unet.onnx")
    assert 0.9 * one_unet <= shared.stat().st_size <= 1.1 * one_unet
    for g in ("unet", "unet_cfg"):
        onnx.checker.check_model(str(tiny_bundle / f"{g}.onnx"))  # by path: the external data is checked too


def test_shared_bundle_generates_the_torch_images(tiny_bundle, tiny_sampler, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path))
    got = Sampler.load(tiny_bundle, backend="onnxruntime", threads=2).generate(["a red fox", "two cats"], **KWARGS)
    ref = tiny_sampler.generate(["a red fox", "two cats"], **KWARGS)
    assert np.abs(ref.images - 0.5).max() > 0.05
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)


def test_both_unet_sessions_read_one_copy_of_the_weights(tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path))
    runners = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1, static_shapes=False).runners
    unet = {v.data_ptr() for v in runners.unet.graph.session._cfgswitch_weights}
    cfg = {v.data_ptr() for v in runners.unet_cfg.graph.session._cfgswitch_weights}
    assert len(unet) > 10 and unet == cfg  # every external initializer of both graphs at the same address


def test_tampered_shared_weights_file_is_refused(bundle_copy):  # noqa: F811
    shared = bundle_copy / read_manifest(bundle_copy).graph_entry("unet")["external_data"]["file"]
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shared.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=shared.name):
        Sampler.load(bundle_copy, backend="onnxruntime")


def _session_files(sampler):
    r = sampler.runners
    return {g: Path(getattr(r, g).graph.session._model_path) for g in ("unet", "unet_cfg")}


def test_optimized_graphs_are_cached_reused_and_a_broken_entry_is_rebuilt(tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path))
    first = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1, static_shapes=False)
    entries = sorted(p for p in (tmp_path / "ort-optimized").iterdir() if p.is_dir())
    assert len(entries) == 3  # text encoder, the two UNet graphs together, VAE decoder
    files = _session_files(first)
    assert files["unet"].parent == files["unet_cfg"].parent and files["unet"].parent.parent == tmp_path / "ort-optimized"
    assert [f.name for f in files["unet"].parent.glob("*.data")] == ["unet_weights.onnx.data"]  # deduplicated there too
    ref = first.generate(["a red fox"], **KWARGS)

    second = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1, static_shapes=False)
    assert _session_files(second) == files  # opened the cached files
    assert files["unet"].stat().st_mtime_ns == _session_files(second)["unet"].stat().st_mtime_ns  # not rewritten
    np.testing.assert_array_equal(second.generate(["a red fox"], **KWARGS).images, ref.images)

    # A killed writer leaves its temporary folder, and (forged here) an entry with a truncated file: neither is used.
    entry = files["unet"].parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = entry.parent / f".{entry.name}.tmp-{int(dead.stdout)}-deadbeef"
    shutil.copytree(entry, partial)
    data = entry / "unet_weights.onnx.data"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    third = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1, static_shapes=False)
    assert _session_files(third) == files and data.stat().st_size == size  # rebuilt in place
    assert not partial.exists()  # the dead writer's folder is cleared
    np.testing.assert_array_equal(third.generate(["a red fox"], **KWARGS).images, ref.images)


def test_plan_cache_keys_cover_the_shared_weights(tiny_bundle):  # noqa: F811
    from cfgswitch.export.build import graph_digests
    from cfgswitch.export.cache import plan_cache_key

    bundle = read_manifest(tiny_bundle)
    (unet, unet_ext), (cfg, cfg_ext) = graph_digests(bundle, "unet"), graph_digests(bundle, "unet_cfg")
    shared = tiny_bundle / bundle.graph_entry("unet")["external_data"]["file"]
    assert unet_ext == cfg_ext == sha256_file(shared) and unet != cfg

    def key(onnx_sha, ext_sha):
        return plan_cache_key(onnx_sha, [], "1.7.1.116", "portable", {"static": True}, ext_sha, "tensorrt-rtx")

    assert key(unet, unet_ext) != key(cfg, cfg_ext)
    assert key(unet, unet_ext) != key(unet, "0" * 64)  # the same .onnx over other weights: another plan


def test_ort_optimized_record_is_opened_after_its_check(bundle_copy, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CFGSWITCH_ORT_SESSION_CACHE", "0")
    fused = bundle_copy / "unet.fused.onnx"
    shutil.copyfile(bundle_copy / "unet.onnx", fused)  # same graph, same shared weights file beside it
    mf = bundle_copy / "manifest.json"
    m = json.loads(mf.read_text())
    m["graphs"]["unet"]["ort_optimized"] = {"file": fused.name, "sha256": sha256_file(fused),
                                            "bytes": fused.stat().st_size, "fusions": []}
    mf.write_text(json.dumps(m))
    sampler = Sampler.load(bundle_copy, backend="onnxruntime", threads=1, static_shapes=False)
    assert Path(sampler.runners.unet.graph.session._model_path) == fused
    shaped = Sampler.load(bundle_copy, backend="onnxruntime", threads=1, static_shapes=True)
    assert shaped.runners.unet.graph.shaped.path == fused  # per-shape sessions open the same checked file

    fused.write_bytes(fused.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="unet.fused.onnx"):
        Sampler.load(bundle_copy, backend="onnxruntime", threads=1, static_shapes=False)
