"""``cfgswitch demo`` on the embedded model."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from cfgswitch.cli import main
from cfgswitch.demo import DEMO_PROMPTS


@pytest.mark.slow
@pytest.mark.parametrize("backend, expected", [("torch", "torch"), ("auto", "onnxruntime")])
def test_demo_writes_grid_and_table(tmp_path, capsys, monkeypatch, backend, expected):
    # auto picks the fastest installed backend: onnxruntime (installed for the tests) through a
    # bundle exported once into the cache
    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--steps", "4", "--repeats", "1", "--backend", backend, "--threads", "1"]) == 0
    out = out_dir / "grid.png"
    assert sorted(p.name for p in out_dir.iterdir()) == ["grid.png"]
    text = capsys.readouterr().out
    assert f"backend: {expected}" in text
    if expected == "onnxruntime":
        assert len(list((tmp_path / "cache" / "bundles").glob("shapes-*/manifest.json"))) == 1
    grid = Image.open(out)
    assert grid.size == (300 + 2 * 192, 22 + 192 * len(DEMO_PROMPTS))
    rows = dict(re.findall(r"^(always|switch:0\.5)\s+[\d.]+\s+(\d+)", text, flags=re.M))
    b = len(DEMO_PROMPTS)
    # 4 steps: always runs 2B rows on each; switch:0.5 runs 2B rows on 2 steps then B rows on 2
    assert rows == {"always": str(2 * b * 4), "switch:0.5": str(2 * b * 2 + b * 2)}
    speedups = re.findall(r"([\d.]+)x$", text, flags=re.M)
    assert len(speedups) == 2 and float(speedups[0]) == 1.0
    # the two plans share the first half of the trajectory but not the images' ends
    a = grid.crop((300, 22, 300 + 192, 22 + 192))
    s = grid.crop((300 + 192, 22, 300 + 2 * 192, 22 + 192))
    assert a.tobytes() != s.tobytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "1"], "--steps: expected an integer >= 2, got 1"),
        (["--out", "afile"], "--out: expected a folder (or a path that does not exist yet), got 'afile (an existing file)'"),
        (["--out", "earlier"], "--out: expected a folder without an earlier run's files (or pass --overwrite), "
                               "got 'earlier (holds grid.png)'"),
        (["--repeats", "0"], "--repeats: expected a positive integer, got 0"),
        (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
        (["--scheduler", "nope"], "scheduler: expected"),
        (["--guidance-scale", "-1"], "guidance_scale: expected a finite number >= 0, got -1.0"),
        (["--seed", "-1"], "seed: expected an integer in [0, 9223372036854775804] for 4 images"),
        (["--prompt", "bad \udcff"], "prompts[0]: expected text that encodes as UTF-8"),
        (["--bundle", "no/such/bundle"], "--bundle: expected a bundle folder with manifest.json"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "grid.png").write_bytes(b"old")
    assert main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err
    # nothing written: no default output folder, the earlier grid untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "earlier"]
    assert (tmp_path / "earlier" / "grid.png").read_bytes() == b"old"


def test_demo_default_output_folder_is_ignored_by_git():
    from pathlib import Path

    from cfgswitch.demo import DEFAULT_OUT

    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert f"/{DEFAULT_OUT}/" in ignored
