"""``cfgswitch generate``'s torch options (--device, --dtype, --mode) reach the runners, and only the torch backend."""

from __future__ import annotations

import json

import pytest

from cfgswitch.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mode_and_dtype_reach_the_torch_runners(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "x", "--model", str(tiny_model_dir), "--steps", "2", "--mode", "eager", "--dtype", "fp32",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["info"]["mode"] == "eager" and result["info"]["dtype"] == "float32"


def test_graphs_mode_needs_cuda_and_options_need_a_backend_that_takes_them(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tiny_model_dir), "--mode", "graphs", "--out", str(tmp_path / "a")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tiny_model_dir), "--backend", "onnxruntime", "--mode", "eager",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--mode: expected the torch backend" in err
