"""The export process: argument checks, atomic write on interrupt, external data, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfgswitch.cli import main
from cfgswitch.errors import InvalidArgumentError, ModelLoadError


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"batch_sizes": []}, "batch_sizes"),
        ({"batch_sizes": [0, 2]}, "batch_sizes"),
        ({"dtype": "int8"}, "dtype"),
        ({"opset": 9}, "opset"),
        ({"height": -8}, "height"),
        ({"width": 1.5}, "width"),
        ({"graphs": ("unet", "nope")}, "graphs"),
    ],
)
def test_check_options_rejects_bad_values(kwargs, argument):
    from cfgswitch.export.exporter import check_options

    with pytest.raises(InvalidArgumentError) as e:
        check_options(**kwargs)
    assert e.value.argument == argument


def test_check_options_normalises():
    from cfgswitch.export.exporter import check_options

    o = check_options(batch_sizes=[4, 1, 2, 2], dtype="FP16")
    assert o.batch_sizes == [1, 2, 4] and o.dtype == "float16" and o.opset == 17


@pytest.mark.parametrize("text", ["", "1,x", "0", "2,-1"])
def test_cli_rejects_bad_batch_sizes(text, tmp_path, capsys):
    rc = main(["export", str(tmp_path / "nomodel"), "--out", str(tmp_path / "b"), "--batch-sizes", text])
    assert rc == 2
    assert "--batch-sizes: expected comma-separated positive integers" in capsys.readouterr().err


def test_cli_rejects_missing_model_before_loading(tmp_path, capsys):
    rc = main(["export", str(tmp_path / "nomodel"), "--out", str(tmp_path / "b")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no such path" in err and "nomodel" in err
    assert not (tmp_path / "b").exists()


def test_export_refuses_existing_out(tiny_model_dir, tmp_path):
    from cfgswitch.export.exporter import export_bundle

    (tmp_path / "b").mkdir()
    with pytest.raises(InvalidArgumentError, match="does not exist yet"):
        export_bundle(tiny_model_dir, tmp_path / "b", progress=False)


def test_export_refuses_size_not_multiple_of_vae_factor(tiny_model_dir, tmp_path):
    from cfgswitch.export.exporter import check_options, export_bundle

    with pytest.raises(InvalidArgumentError, match="multiple of the model's VAE factor 2"):
        export_bundle(tiny_model_dir, tmp_path / "b", check_options(height=15, graphs=("vae_decoder",)), progress=False)
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder


def test_interrupted_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the graphs: no bundle at --out and no temporary folder left."""
    import cfgswitch.export.exporter as exporter

    real = exporter.export_graph
    done = []

    def interrupt_on_third(module, spec, inputs, path, opset=17):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(spec.name)
        return real(module, spec, inputs, path, opset)

    monkeypatch.setattr(exporter, "export_graph", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_bundle(tiny_model_dir, tmp_path / "bundle", progress=False)
    assert done == ["text_encoder", "unet"]
    assert list(tmp_path.iterdir()) == []


def test_large_graph_path_writes_one_external_data_file(tiny_model_dir, tmp_path, monkeypatch):
    """Graphs over the 2 GB threshold keep their weights in one ``.onnx.data`` file (threshold lowered)."""
    import onnxruntime as ort

    import cfgswitch.export.onnx_export as onnx_export
    from cfgswitch.export.exporter import check_options, export_bundle
    from cfgswitch.export.wrappers import VaeDecoderGraph

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = export_bundle(tiny_model_dir, tmp_path / "b", check_options(graphs=("vae_decoder",), batch_sizes=[1]), progress=False)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == ["manifest.json", "vae_decoder.onnx", "vae_decoder.onnx.data"]
    mode = (out / "vae_decoder.onnx").stat().st_mode & 0o777
    assert (out / "vae_decoder.onnx.data").stat().st_mode & 0o777 == mode  # readable by a serving user too
    entry = json.loads((out / "manifest.json").read_text())["graphs"]["vae_decoder"]
    assert entry["external_data"]["file"] == "vae_decoder.onnx.data"
    # all but the tiny (< 1 KiB) tensors moved out of the .onnx file
    assert entry["external_data"]["bytes"] > 0.95 * entry["weight_bytes"] > (out / "vae_decoder.onnx").stat().st_size
    # ONNX Runtime loads it (weights come from the data file) and matches torch.
    from cfgswitch.model_loading import load_components

    _, _, _, vae, _ = load_components(tiny_model_dir, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(out / "vae_decoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"latents": x.numpy()})[0]
    with torch.no_grad():
        ref = VaeDecoderGraph(vae)(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_model_dir_with_pickles_is_refused(tmp_path):
    from cfgswitch.export.exporter import export_bundle

    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion folder"):
        export_bundle(tmp_path / "m", tmp_path / "b", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_content_hash_of_modules_tracks_weights():
    from cfgswitch.export.manifest import content_hash_modules

    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    h = content_hash_modules({"unet": a})
    assert h.startswith("sha256:") and h == content_hash_modules({"unet": b})
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    assert content_hash_modules({"unet": b}) != h
    assert content_hash_modules({"vae": a}) != h  # the component name is part of it
