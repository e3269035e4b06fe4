"""Every bad bundle and bad request raises a typed error that names the file or the flag to change."""

from __future__ import annotations

import json
import sys

import pytest
from _bundle_fixtures import bundle_copy, ort_sampler, tiny_bundle  # noqa: F401  (fixtures)

from cfgswitch import Sampler
from cfgswitch.bundle import read_manifest, verify_graphs
from cfgswitch.errors import BackendUnavailableError, BundleError, InvalidArgumentError


def _edit_manifest(path, fn):
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="no such path"):
        read_manifest(tmp_path / "nothing")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BundleError, match="a file"):
        read_manifest(tmp_path / "f")


def test_no_manifest_names_the_export_command(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest.json .*cfgswitch export MODEL_DIR --out"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("text, message", [("{not json", "malformed"), ("[1, 2]", "expected a JSON object"),
                                           ('{"format": "other"}', "not a cfgswitch manifest")])
def test_malformed_manifest(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=message):
        read_manifest(tmp_path)


def test_unknown_schema_version(bundle_copy):  # noqa: F811
    _edit_manifest(bundle_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match=r"unknown manifest schema version 99 \(this cfgswitch reads version 1\)"):
        read_manifest(bundle_copy)


@pytest.mark.parametrize("key", ["graphs", "dims", "batch_sizes"])
def test_missing_manifest_entry(bundle_copy, key):  # noqa: F811
    _edit_manifest(bundle_copy, lambda m: m.pop(key))
    with pytest.raises(BundleError, match=f"malformed: missing {key}"):
        read_manifest(bundle_copy)


def test_incomplete_graph_entry(bundle_copy):  # noqa: F811
    _edit_manifest(bundle_copy, lambda m: m["graphs"]["unet_cfg"].pop("sha256"))
    with pytest.raises(BundleError, match="graph 'unet_cfg' missing or incomplete"):
        read_manifest(bundle_copy)


def test_replaced_graph_fails_sha256(bundle_copy):  # noqa: F811
    f = bundle_copy / "unet.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"graph 'unet' file unet.onnx has sha256 .* \(replaced or corrupted"):
        Sampler.load(bundle_copy, backend="onnxruntime")


def test_truncated_graph_fails_size(bundle_copy):  # noqa: F811
    f = bundle_copy / "vae_decoder.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"vae_decoder.onnx has 1000 bytes, the manifest records \d+ \(truncated"):
        verify_graphs(read_manifest(bundle_copy))


def test_missing_graph_file(bundle_copy):  # noqa: F811
    (bundle_copy / "text_encoder.onnx").unlink()
    with pytest.raises(BundleError, match="text_encoder.onnx is missing"):
        Sampler.load(bundle_copy, backend="onnxruntime")


def test_missing_tokenizer(bundle_copy):  # noqa: F811
    import shutil

    shutil.rmtree(bundle_copy / "tokenizer")
    with pytest.raises(BundleError, match="missing tokenizer folder"):
        Sampler.load(bundle_copy, backend="onnxruntime", verify_files=False)


def test_batch_outside_bundle_names_export_flag(ort_sampler):  # noqa: F811
    with pytest.raises(BundleError, match=r"batch size 4 is not supported .*supported: 1..3.*--batch-sizes including 4"):
        ort_sampler.generate(["a"] * 4, steps=1, output_type="latent")


def test_size_outside_bundle_names_export_flag(ort_sampler):  # noqa: F811
    with pytest.raises(BundleError, match=r"image size 32x16 is not supported .*16x16.*--height 32 --width 16"):
        ort_sampler.generate(["a"], steps=1, height=32, width=16, output_type="latent")


def test_missing_onnxruntime_names_the_extra(tiny_bundle, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it does on import
    with pytest.raises(BackendUnavailableError, match=r"pip install 'cfgswitch\[cpu\]'"):
        Sampler.load(tiny_bundle, backend="onnxruntime")


def test_no_backend_installed_names_both_extras(tiny_bundle, monkeypatch):  # noqa: F811
    from cfgswitch.backends.registry import BACKENDS

    for entry in BACKENDS.values():  # every bundle backend of the registry (onnxruntime, tensorrt, openvino, ...)
        if entry.source == "bundle" and entry.module:
            monkeypatch.setitem(sys.modules, entry.module, None)
    with pytest.raises(BackendUnavailableError, match=r"cfgswitch\[cpu\].*cfgswitch\[gpu\]"):
        Sampler.load(tiny_bundle)


def test_gpu_provider_missing_names_gpu_extra(tiny_bundle):  # noqa: F811
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider is not in this onnxruntime build.*cfgswitch\[gpu\]"):
        Sampler.load(tiny_bundle, backend="onnxruntime", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_unknown_provider(tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match="providers: expected providers of this onnxruntime build"):
        Sampler.load(tiny_bundle, backend="onnxruntime", providers="FancyExecutionProvider")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_threads(tiny_bundle, threads):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match="threads: expected a positive integer"):
        Sampler.load(tiny_bundle, backend="onnxruntime", threads=threads)


def test_torch_backend_on_bundle_is_refused(tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match=r"'onnxruntime', 'tensorrt' .*for a bundle \(the torch backend runs a diffusers folder\), got 'torch'"):
        Sampler.load(tiny_bundle, backend="torch")


def test_unknown_backend_option(tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match="options of backend 'onnxruntime'.*cuda_graphs"):
        Sampler.load(tiny_bundle, backend="onnxruntime", cuda_graphs=True)


def test_tensorrt_backend_without_tensorrt_names_gpu_extra(tiny_bundle, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'cfgswitch\[gpu\]'"):
        Sampler.load(tiny_bundle, backend="tensorrt")
