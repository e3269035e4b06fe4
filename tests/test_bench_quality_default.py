"""``cfgswitch bench`` without ``--quality`` still reports every plan's quality beside its speed."""

from __future__ import annotations

import json

import pytest

from cfgswitch.cli import main


@pytest.mark.slow
def test_default_bench_reports_quality_beside_speed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(tiny_model_dir), "--steps", "2", "--repeat", "1", "--batch", "1",
                 "--plans", "always,switch:0.5", "--backend", "torch", "--baseline", "none", "--role-repeat", "1",
                 "--threads", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["quality"] is False and r["sweep"] is None  # no --quality: no sweep ...
    q = r["quality"]["cells"]  # ... but each cell's quality against always-CFG
    assert set(q) == {"cfgswitch/torch/always/b1", "cfgswitch/torch/switch:0.5/b1"}
    assert q["cfgswitch/torch/always/b1"]["psnr_mean_db"] is None  # identical to itself
    psnr = q["cfgswitch/torch/switch:0.5/b1"]["psnr_mean_db"]
    assert psnr is not None and psnr > 0
    report = (out / "report.md").read_text()
    table = report.split("## Every plan: speed and quality")[1].split("## Targets")[0]
    row = next(line for line in table.splitlines() if "switch:0.5" in line)
    assert row.rstrip(" |").endswith(f"{psnr:.1f} dB")
    # the printed summary carries the same column and says what it holds
    assert f"{psnr:.1f} dB" in printed and "quality = the shapes scorer's accuracy" in printed


def test_speed_tables_carry_a_quality_column():
    from cfgswitch.benchmarks.report import HEADLINE_HEADER, cell_quality, headline_rows, plans_table

    def derived(total):
        return {"total_median_s": total, "ideal_speedup": 1.0, "realized_speedup": 2.0 / total, "realized_fraction": 1.0,
                "loop_realized_fraction": 1.0, "speedup_vs_diffusers_always": None, "reference": "cfgswitch/torch/always/b4"}

    results = {
        "config": {"plans": ["always", "switch:0.5"], "batches": [4]},
        "cells": [{"id": f"cfgswitch/torch/{p}/b4", "system": "cfgswitch", "backend": "torch", "plan": p, "batch": 4,
                   "unet_rows": rows} for p, rows in (("always", 240), ("switch:0.5", 180))],
        "derived": {"cells": {"cfgswitch/torch/always/b4": derived(2.0), "cfgswitch/torch/switch:0.5/b4": derived(1.5)}},
        "quality": {"cells": {"cfgswitch/torch/always/b4": {"psnr_mean_db": None},
                              "cfgswitch/torch/switch:0.5/b4": {"psnr_mean_db": 31.25}},
                    "scorer": {"cfgswitch/torch/switch:0.5/b4": {"all_attributes": 0.875}}},
    }
    assert cell_quality(results, "cfgswitch/torch/switch:0.5/b4") == "87.5%"  # the scorer wins over PSNR
    assert cell_quality(results, "cfgswitch/torch/always/b4") == "identical"
    assert cell_quality(results, "cfgswitch/torch/nothing/b4") is None
    (row,) = headline_rows(results)
    assert HEADLINE_HEADER[-2:] == ["always quality", "switch:0.5 quality"] and row[-2:] == ["identical", "87.5%"]
    table = plans_table(results)
    assert "| quality" in table.splitlines()[0]
    assert [line.split("|")[-2].strip() for line in table.splitlines()[2:]] == ["identical", "87.5%"]
