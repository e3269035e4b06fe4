"""``cfgswitch bench`` end to end on the tiny model: result files, their schema, every ratio from raw timings."""

from __future__ import annotations

import json
import statistics

import pytest

from cfgswitch.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("text", "unet_cfg", "unet_late", "scheduler", "vae", "loop", "total")
REL = 1e-12  # derived numbers are the same floating-point formulas: equal up to rounding


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    code = main(["bench", "--model", str(tiny_model_dir), "--steps", "2", "--repeat", "2", "--batch", "1",
                 "--plans", "always,switch:0.5,adaptive:0.995", "--backend", "torch,onnxruntime", "--quality", "--sweep", "0.5", "--role-repeat", "3",
                 "--threads", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def _check_keys(obj, keys, where):
    missing = [k for k in keys if k not in obj]
    assert not missing, f"{where}: missing {missing}"


@pytest.mark.slow
def test_result_files_and_schema(bench_run):
    out, r = bench_run
    for name in ("results.json", "report.md", "speed.png", "sweep_time.png", "sweep_quality.png", "images.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png.name
    _check_keys(r, ("schema_version", "kind", "created_utc", "argv", "machine", "config", "model", "prompts", "role_costs",
                    "cells", "sweep", "quality", "notes", "elapsed_s", "derived"), "results")
    assert r["schema_version"] == 1 and r["kind"] == "cfgswitch-bench"
    _check_keys(r["machine"], ("cpu_model", "cpu_cores", "torch_threads", "gpu", "python", "libraries"), "machine")
    assert r["machine"]["torch_threads"] == 1 and r["machine"]["libraries"]["torch"] and r["machine"]["libraries"]["diffusers"]
    assert r["config"]["plans"] == ["always", "switch:0.5", "adaptive:0.995"] and r["config"]["steps"] == 2
    # cells: our three plans on both backends, and diffusers for the two plans it can run
    ids = sorted(c["id"] for c in r["cells"])
    ours = [f"cfgswitch/{b}/{p}/b1" for b in ("torch", "onnxruntime") for p in ("always", "switch:0.5", "adaptive:0.995")]
    assert ids == sorted(ours + ["diffusers/torch/always/b1", "diffusers/torch/switch:0.5/b1"])
    assert any("onnxruntime: ran a float32 ONNX bundle exported from the model" in n for n in r["notes"])
    for c in r["cells"]:
        _check_keys(c, ("id", "system", "backend", "plan", "batch", "steps", "cfg_steps", "late_steps", "unet_rows", "calls"), c["id"])
        assert len(c["calls"]) == 2  # repeat 2; the warm-up call is not recorded
        assert c["cfg_steps"] + c["late_steps"] == 2
        assert c["unet_rows"] == 2 * c["batch"] * c["cfg_steps"] + c["batch"] * c["late_steps"]
        keys = STAGES if c["system"] == "cfgswitch" else ("total",)
        for call in c["calls"]:
            _check_keys(call, keys, c["id"])
            assert all(call[k] >= 0 for k in keys) and call["total"] > 0
    assert {(c["plan"], c["cfg_steps"]) for c in r["cells"] if c["plan"] != "adaptive:0.995"} == {("always", 2), ("switch:0.5", 1)}
    assert sorted(e["backend"] for e in r["role_costs"]) == ["onnxruntime", "torch"]
    # --role-repeat 3 over 2 timed rounds: ceil(3 / 2) = 2 direct calls of each role per round
    assert all(len(e["cfg_s"]) == 4 and len(e["late_s"]) == 4 and e["batch"] == 1 for e in r["role_costs"])
    # quality: every cell against its always cell, and the baseline matches the sampler
    assert set(r["quality"]["cells"]) == set(ids)
    assert r["quality"]["cells"]["cfgswitch/torch/always/b1"]["l1_mean"] == 0.0
    assert set(r["quality"]["parity"]) == {"diffusers/torch/always/b1", "diffusers/torch/switch:0.5/b1"}
    for p in r["quality"]["parity"].values():
        assert p["max_abs"] <= 1e-6  # the baseline computes what the torch backend computes
    assert r["sweep"]["points"] == [{"fraction": 0.5, "plan": "switch:0.5", "cells": {
        "torch": "cfgswitch/torch/switch:0.5/b1", "onnxruntime": "cfgswitch/onnxruntime/switch:0.5/b1"}}]
    assert "/tmp" not in json.dumps(r["model"])  # no absolute path of this machine


@pytest.mark.slow
def test_every_ratio_recomputes_from_raw_timings(bench_run):
    _, r = bench_run
    d = r["derived"]
    med = statistics.median
    roles = {(e["backend"], e["batch"]): (med(e["cfg_s"]), med(e["late_s"])) for e in r["role_costs"]}
    cells = {c["id"]: c for c in r["cells"]}
    totals = {cid: med([x["total"] for x in c["calls"]]) for cid, c in cells.items()}
    for cid, c in cells.items():
        got = d["cells"][cid]
        totals_c = [x["total"] for x in c["calls"]]
        assert got["total_median_s"] == pytest.approx(med(totals_c), rel=REL)
        assert got["total_min_s"] == min(totals_c) and got["total_max_s"] == max(totals_c)
        assert got["images_per_s"] == pytest.approx(c["batch"] / med(totals_c), rel=REL)
        C, L = roles[(c["backend"], c["batch"])]
        ideal = c["steps"] * C / (c["cfg_steps"] * C + c["late_steps"] * L)
        assert got["ideal_speedup"] == pytest.approx(ideal, rel=REL)
        ref = f"{c['system']}/{c['backend']}/always/b{c['batch']}"
        assert got["reference"] == ref
        assert got["realized_speedup"] == pytest.approx(totals[ref] / totals[cid], rel=REL)
        assert got["realized_fraction"] == pytest.approx(totals[ref] / totals[cid] / ideal, rel=REL)
        saved = c["late_steps"] * (C - L)
        assert got["ideal_saved_s"] == pytest.approx(saved, rel=REL)
        assert got["ideal_total_s"] == pytest.approx(totals[ref] - saved, rel=REL)
        if c["late_steps"]:
            assert got["saved_fraction_of_ideal"] == pytest.approx((totals[ref] - totals[cid]) / saved, rel=REL)
        assert got["speedup_vs_diffusers_always"] == pytest.approx(totals["diffusers/torch/always/b1"] / totals[cid], rel=REL)
        if c["system"] == "cfgswitch":
            for s in STAGES:
                assert got["stage_median_s"][s] == pytest.approx(med([x[s] for x in c["calls"]]), rel=REL)
            host = med([(x["loop"] - x["unet_cfg"] - x["unet_late"]) / c["steps"] for x in c["calls"]])
            assert got["host_overhead_per_step_s"] == pytest.approx(host, rel=REL)
            loop_ref = med([x["loop"] for x in cells[ref]["calls"]])
            assert got["loop_speedup"] == pytest.approx(loop_ref / med([x["loop"] for x in c["calls"]]), rel=REL)
    t = d["targets"]
    fr = t["switch_realized_fraction"]
    assert fr["values"] == {f"cfgswitch/{b}/switch:0.5/b1": d["cells"][f"cfgswitch/{b}/switch:0.5/b1"]["realized_fraction"]
                            for b in ("torch", "onnxruntime")}
    assert fr["met"] == (fr["min"] >= 0.97)
    hosts = [d["cells"][cid]["host_overhead_per_step_s"] for cid, c in cells.items() if c["system"] == "cfgswitch"]
    assert t["host_overhead_per_step_s"]["max"] == max(hosts)


@pytest.mark.slow
def test_report_shows_the_stored_numbers(bench_run):
    out, r = bench_run
    report = (out / "report.md").read_text()
    s = r["derived"]["cells"]["cfgswitch/torch/switch:0.5/b1"]
    headline = report.split("## Headline")[1].split("## Targets")[0]
    row = next(line for line in headline.splitlines() if line.startswith("| cfgswitch torch "))
    assert f"{s['realized_speedup']:.2f}x" in row and f"{s['ideal_speedup']:.2f}x" in row
    assert f"{s['total_median_s'] * 1e3:.1f}" in row
    assert r["machine"]["cpu_model"] in report
    assert "![speed](speed.png)" in report and "![sweep_time](sweep_time.png)" in report
    # no absolute path of this machine in a file meant to be committed
    assert str(out.parent) not in report
