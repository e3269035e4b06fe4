"""``cfgswitch generate`` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from cfgswitch import Sampler
from cfgswitch.cli import main


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cfgswitch", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_writes_pngs_and_result(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    r = run_cli("generate", "a red square", "a blue circle", "--model", str(tiny_model_dir), "--steps", "4",
                "--plan", "switch:0.5:cond", "--seed", "9", "--scheduler", "euler", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["files"] == ["image_000.png", "image_001.png"]
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
