"""``cfgswitch generate`` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cfgswitch import Sampler
from cfgswitch.cli import main
from cfgswitch.backends.registry import importable


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cfgswitch", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_writes_pngs_and_result(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    r = run_cli("generate", "a red square", "a blue circle", "--model", str(tiny_model_dir), "--steps", "4",
                "--plan", "switch:0.5:cond", "--seed", "9", "--scheduler", "euler", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["files"] == ["image_000.png", "image_001.png"]
    assert (result["height"], result["width"]) == (16, 16)  # the tiny model's native size, never null
    assert (result["cfg_steps"], result["late_steps"], result["unet_rows"]) == (2, 2, 2 * 2 * 2 + 2 * 2)
    assert result["plan"] == "switch:0.5:cond" and result["seeds"] == [9, 10] and result["warnings"] == []
    assert set(result["timings"]) >= {"text", "unet_cfg", "unet_late", "scheduler", "vae", "total"}
    # the PNG is exactly what the library generates
    direct = Sampler.from_diffusers(tiny_model_dir).generate(
        ["a red square", "a blue circle"], steps=4, plan="switch:0.5:cond", seed=9, scheduler="euler")
    png = np.asarray(Image.open(out / "image_001.png"))
    assert np.array_equal(png, np.asarray(direct.images[1]))


def test_generate_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys):
    cases = [
        (["--plan", "switch:1.5"], "plan: expected a valid plan"),
        (["--scheduler", "heun"], "calls it more than once per step"),
        (["--steps", "0"], "steps: expected an integer in [1, 10000], got 0"),
        (["--guidance", "nan"], "guidance_scale: expected a finite number >= 0, got nan"),
        (["--height", "15"], "height: expected a multiple of the VAE factor 2, got 15"),
        (["--width", "100000"], "width: expected at most 32 pixels (max_image_side"),
        (["--plan", "step:-1"], "plan: expected a valid plan (step: an integer >= 0), got 'step:-1'"),
        (["--plan", "step:100", "--steps", "10"], "plan: expected step:K with K <= steps (10)"),
        (["--seed", str(2**63)], "seed: expected an integer in [0, 9223372036854775807], got 9223372036854775808"),
        (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
    ]
    for extra, message in cases:  # in-process: the same main() the console script calls
        code = main(["generate", "x", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("cfgswitch generate: error:") and message in last, (extra, last)
        assert not (tmp_path / "o").exists()
    r = run_cli("generate", "x", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such path" in r.stderr and "Traceback" not in r.stderr


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_generate_checks_before_loading_the_model(tmp_path, capsys):
    # the model does not exist: each error below is raised before any load is tried
    missing = str(tmp_path / "no-model")
    existing = tmp_path / "image.png"
    existing.write_bytes(b"not an image")
    cases = [
        (["x", "--out", str(existing)], f"--out: expected a folder (or a path that does not exist yet), got '{existing} (an existing file)'"),
        (["x", "--steps", "0"], "steps: expected an integer in [1, 10000], got 0"),
        (["x", "--guidance-scale", "-2"], "guidance_scale: expected a finite number >= 0, got -2.0"),
        (["bad \udcff", "--out", str(tmp_path / "o")], "prompts[0]: expected text that encodes as UTF-8 (character 4 is a lone surrogate"),
        (["x", "--plan", "sometimes"], "plan: expected a plan string"),
    ]
    for argv, message in cases:
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "o")]
        code = main(["generate", *argv, "--model", missing])
        last = _last_error_line(capsys)
        assert code == 2 and last.startswith("cfgswitch generate: error: ") and message in last, (argv, last)
    assert existing.read_bytes() == b"not an image" and not (tmp_path / "o").exists()


def test_output_folder_with_earlier_images_needs_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a", "b", "--model", str(tiny_model_dir), "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["image_000.png", "image_001.png", "result.json"]
    capsys.readouterr()
    code = main(["generate", "c", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(out)])
    assert code == 2
    assert _last_error_line(capsys) == (f"cfgswitch generate: error: --out: expected a folder without an earlier run's files "
                                        f"(or pass --overwrite), got '{out} (holds image_000.png, image_001.png, result.json)'")
    # --overwrite: the earlier run's second image does not stay beside the new result.json
    assert main(["generate", "c", "--model", str(tiny_model_dir), "--steps", "2", "--threads", "1", "--out", str(out),
                 "--overwrite", "--guidance", "5"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["image_000.png", "result.json"]
    result = json.loads((out / "result.json").read_text())
    assert result["prompts"] == ["c"] and result["guidance_scale"] == 5.0 and result["threads"] == 1


def test_one_vocabulary_and_defaults_in_help(capsys):
    from cfgswitch.cli import build_parser

    for command in ("generate", "demo", "analyze", "bench"):
        parser = build_parser(command)
        base = [command, "x"] if command == "generate" else [command]
        extra = ["--out", "o"] if command == "generate" else []
        old = parser.parse_args(base + extra + ["--guidance", "3"])
        new = parser.parse_args(base + extra + ["--guidance-scale", "3"])
        assert vars(old) == vars(new), command
        assert old.steps == 30 and old.seed == 0 and old.scheduler == "ddim", command
        assert old.threads is None and "model" in vars(old), command
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: 30)" in text and "(default: ddim)" in text and "(default: 7.5)" in text, (command, text)
        assert "--guidance-scale W, --guidance W" in text and "--threads" in text, command
    parser = build_parser("generate")
    assert parser.parse_args(["generate", "x", "--out", "o"]).plan == "auto"
    assert parser.parse_args(["generate", "x", "--out", "o"]).model == "default"


def test_third_party_warnings_go_to_the_debug_log(tmp_path, tiny_model_dir):
    # diffusers warns on every load here ("install accelerate"): shown only at -v, as a DEBUG record
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: diffusers has no load-time warning to route")
    args = ["generate", "x", "--model", str(tiny_model_dir), "--steps", "1", "--threads", "1"]
    quiet = run_cli(*args, "--out", str(tmp_path / "a"))
    assert quiet.returncode == 0, quiet.stderr
    assert "accelerate" not in quiet.stderr
    loud = run_cli("-v", *args, "--out", str(tmp_path / "b"))
    assert loud.returncode == 0, loud.stderr
    assert "DEBUG diffusers" in loud.stderr and "accelerate" in loud.stderr


def test_client_without_server_is_one_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("client", "x", "--url", f"127.0.0.1:{port}", "--timeout", "10")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"cfgswitch client: error: --url: expected HOST:PORT of a running cfgswitch server (http), "
        f"got '127.0.0.1:{port} (connection refused)'")


@pytest.mark.slow
def test_ctrl_c_stops_generate_between_steps(tmp_path, tiny_model_dir):
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cfgswitch", "generate", "x", "--model", str(tiny_model_dir),
                             "--steps", "999", "--height", "32", "--width", "32", "--threads", "1", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # as from a terminal: a test run started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while b"denoising:" not in seen and time.monotonic() < deadline:  # the loop has started
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        assert b"denoising:" in seen, seen.decode(errors="replace")
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("cfgswitch generate: interrupted")
    assert stopped_in < 10  # between two steps, not after the 999
    assert not out.exists()


@pytest.mark.slow
def test_export_default_carries_the_recommendations(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the bundle runs on ONNX Runtime (the cpu extra)")
    from cfgswitch.default_model import EMBEDDED_MODEL_DIR

    if not (EMBEDDED_MODEL_DIR / "cfgswitch.json").is_file():
        pytest.skip("the embedded model is not shipped in this checkout")
    bundle = tmp_path / "shapes-bundle"
    assert main(["export", "default", "--out", str(bundle), "--batch-sizes", "1", "--threads", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(bundle)
    shipped = json.loads((EMBEDDED_MODEL_DIR / "cfgswitch.json").read_text())
    assert json.loads((bundle / "cfgswitch.json").read_text()) == shipped
    out = Sampler.load(bundle, backend="onnxruntime").generate("a red circle", steps=10, plan="auto", output_type="latent")
    assert out.plan == shipped["recommended_plan"] == "switch:0.2:cond" and (out.cfg_steps, out.late_steps) == (2, 8)
    # generate on the bundle: --threads reaches ONNX Runtime, --plan auto reads the bundle's file
    assert main(["generate", "a red circle", "--model", str(bundle), "--steps", "10", "--threads", "1",
                 "--out", str(tmp_path / "gen")]) == 0
    result = json.loads((tmp_path / "gen" / "result.json").read_text())
    picked = "openvino" if importable("openvino") else "onnxruntime"
    assert (result["backend"], result["plan"], result["threads"]) == (picked, "switch:0.2:cond", 1)
    assert (result["height"], result["width"]) == (64, 64)
