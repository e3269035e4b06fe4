"""Parts of the benchmark harness: argument checks, the derived numbers, quality metrics, the diffusers baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfgswitch.benchmarks.baseline import CfgCutoffCallback, DiffusersBaseline, baseline_plans, baseline_switch_step
from cfgswitch.benchmarks.config import BenchConfig, check_config, parse_plans
from cfgswitch.benchmarks.derive import derive, ideal_speedup, paired_ratio, same_unet_ratio
from cfgswitch.benchmarks.measure import forward_timer, rotate, sampler_call
from cfgswitch.benchmarks.quality import compare, l1_per_image, psnr_per_image, scorer_accuracy
from cfgswitch.cli import main
from cfgswitch.errors import BackendUnavailableError, InvalidArgumentError, PlanParseError, UnknownSchedulerError


# ----------------------------------------------------------------------------- arguments
def test_parse_plans_puts_always_first_and_normalizes():
    assert parse_plans("switch:0.50, interval:0.2:0.6,always,switch:0.5") == ["always", "switch:0.5", "interval:0.2:0.6"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"plans": "sometimes"}, PlanParseError, "plan: expected a plan string"),
        ({"batches": "1,x"}, InvalidArgumentError, "batch: expected comma-separated integers in [1, 1024], got '1,x'"),
        ({"batches": "0"}, InvalidArgumentError, "batch: expected integers in [1, 1024], got '0'"),
        ({"steps": 0}, InvalidArgumentError, "steps: expected an integer in [1, 1000], got 0"),
        ({"repeat": 0}, InvalidArgumentError, "repeat: expected an integer in [1, 1000], got 0"),
        ({"scheduler": "heun"}, UnknownSchedulerError, "calls it more than once per step"),
        ({"backends": "tensorrt"}, BackendUnavailableError, "backend tensorrt: TensorRT is not installed"),
        ({"backends": "torch", "bundle": "b"}, InvalidArgumentError, "backend: expected no 'torch' with --bundle alone"),
        ({"backends": "cuda"}, InvalidArgumentError, "backend: expected one or more of torch, onnxruntime, tensorrt"),
        ({"baseline": "pipeline"}, InvalidArgumentError, "baseline: expected 'diffusers' or 'none'"),
        ({"sweep": [0.5, 1.0]}, InvalidArgumentError, "sweep: expected fractions strictly between 0 and 1"),
    ],
)
def test_check_config_rejects(kwargs, error, message):
    with pytest.raises(error) as info:
        check_config(BenchConfig(**kwargs))
    assert message in str(info.value)


def test_cli_reports_bad_arguments_in_one_line_before_loading(capsys, tmp_path):
    code = main(["bench", "--model", str(tmp_path / "absent"), "--plans", "always,often", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("cfgswitch bench: error: plan: expected a plan string")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- derived numbers
def _raw():
    calls_always = [{"text": 0.01, "unet_cfg": 0.8, "unet_late": 0.0, "scheduler": 0.01, "vae": 0.05, "loop": 0.82, "total": 0.9},
                    {"text": 0.01, "unet_cfg": 0.9, "unet_late": 0.0, "scheduler": 0.01, "vae": 0.05, "loop": 0.92, "total": 1.0}]
    calls_switch = [{"text": 0.01, "unet_cfg": 0.4, "unet_late": 0.2, "scheduler": 0.01, "vae": 0.05, "loop": 0.61, "total": 0.7},
                    {"text": 0.01, "unet_cfg": 0.4, "unet_late": 0.3, "scheduler": 0.01, "vae": 0.05, "loop": 0.72, "total": 0.8},
                    {"text": 0.01, "unet_cfg": 0.4, "unet_late": 0.25, "scheduler": 0.01, "vae": 0.05, "loop": 0.66, "total": 0.75}]
    base = {"system": "cfgswitch", "backend": "torch", "batch": 2, "steps": 10, "sweep": False}
    return {
        "role_costs": [{"backend": "torch", "batch": 2, "cfg_s": [0.08, 0.09, 0.1], "late_s": [0.05, 0.04]}],
        "cells": [
            {**base, "id": "a", "plan": "always", "cfg_steps": 10, "late_steps": 0, "calls": calls_always},
            {**base, "id": "s", "plan": "switch:0.5", "cfg_steps": 5, "late_steps": 5, "calls": calls_switch},
            {**base, "id": "d", "system": "diffusers", "plan": "always", "cfg_steps": 10, "late_steps": 0,
             "calls": [{"total": 1.5}, {"total": 1.7}]},
        ],
        "elapsed_s": 12.0,
    }


def test_derive_by_hand():
    d = derive(_raw())
    assert d["role_costs"]["torch/b2"] == pytest.approx({"cfg_median_s": 0.09, "late_median_s": 0.045, "late_over_cfg": 0.5})
    s = d["cells"]["s"]
    assert s["total_median_s"] == pytest.approx(0.75) and s["total_min_s"] == 0.7 and s["total_max_s"] == 0.8
    assert s["ideal_speedup"] == pytest.approx(10 * 0.09 / (5 * 0.09 + 5 * 0.045))  # 4/3
    assert s["realized_speedup"] == pytest.approx(0.95 / 0.75)  # always: median of 0.9 and 1.0
    assert s["realized_fraction"] == pytest.approx((0.95 / 0.75) / (4 / 3))
    assert s["loop_speedup"] == pytest.approx(0.87 / 0.66)
    # UNet time saved: 5 late steps x (0.09 - 0.045); saved end to end: 0.95 - 0.75
    assert s["ideal_saved_s"] == pytest.approx(0.225) and s["ideal_total_s"] == pytest.approx(0.95 - 0.225)
    assert s["saved_fraction_of_ideal"] == pytest.approx(0.2 / 0.225)
    # host overhead per step: median of (0.01, 0.02, 0.01) / 10
    assert s["host_overhead_per_step_s"] == pytest.approx(0.001)
    assert s["images_per_s"] == pytest.approx(2 / 0.75)
    assert s["speedup_vs_diffusers_always"] == pytest.approx(1.6 / 0.75)
    assert d["cells"]["d"]["ideal_speedup"] == pytest.approx(1.0) and "host_overhead_per_step_s" not in d["cells"]["d"]
    t = d["targets"]
    assert t["switch_realized_fraction"]["met"] is False  # 95% < 97%
    assert t["switch_vs_diffusers_always"]["best_per_batch"] == {"b2": pytest.approx(1.6 / 0.75)}
    assert t["switch_vs_diffusers_always"]["met"] is True
    # the always cell has the largest: (0.82 - 0.8) / 10
    assert t["host_overhead_per_step_s"]["max"] == pytest.approx(0.002) and t["host_overhead_per_step_s"]["met"] is False
    assert t["elapsed_s"]["met"] is True


def test_torch_against_diffusers_is_paired_by_round():
    d = derive(_raw())
    # always: (0.9, 1.0); diffusers: (1.5, 1.7) -> per-round ratios 1.5/0.9 and 1.7/1.0
    a = d["cells"]["a"]["paired_vs_diffusers_always"]
    assert a["median"] == pytest.approx((1.5 / 0.9 + 1.7) / 2) and a["rounds"] == 2
    assert a["p25"] <= a["median"] <= a["p75"]
    t = d["targets"]["torch_always_vs_diffusers"]
    # no call carries the UNet's forward time, so the paired ratio decides
    assert t["paired_median"] == {"b2": pytest.approx(a["median"])} and t["met"] is True
    assert t["basis"] == "paired_median" and t["same_unet_ratio"] == {}
    assert t["ratio_of_medians"] == {"b2": pytest.approx(1.6 / 0.95)}
    # outside the UNet: always's totals minus unet_cfg + unet_late: (0.1, 0.1); diffusers' calls carry no UNet time
    assert d["cells"]["a"]["outside_unet_median_s"] == pytest.approx(0.1)
    assert t["outside_unet_s"] == {"b2": {"cfgswitch": pytest.approx(0.1), "diffusers": None}}
    # the switch cell has three calls, diffusers two: not paired
    assert d["cells"]["s"]["paired_vs_diffusers_always"] is None


def test_paired_ratio_is_taken_per_round_and_fails_the_target_at_two_percent():
    # the machine slows down in the last rounds; ours is 2% slower than the reference in every round,
    # and one round of ours was disturbed (x1.5) without the reference being disturbed
    drift = [1.0, 1.0, 1.3, 1.3, 1.3]
    ref = [{"total": 0.5 * f} for f in drift]
    ours = [{"total": 0.51 * f * (1.5 if i == 0 else 1.0)} for i, f in enumerate(drift)]
    p = paired_ratio(ref, ours)
    assert p["median"] == pytest.approx(0.5 / 0.51) and p["p75"] == pytest.approx(0.5 / 0.51)
    assert p["p25"] == pytest.approx(0.5 / 0.51) and p["rounds"] == 5
    assert paired_ratio(ref, ours[:4]) is None and paired_ratio([], []) is None
    ref = [{**c, "unet": c["total"] - 0.02} for c in ref]  # diffusers: 20 ms outside the UNet module
    d = {"cells": [{"system": "cfgswitch", "backend": "torch", "plan": "always", "batch": 1, "id": "a", "calls": ours},
                   {"system": "diffusers", "backend": "torch", "plan": "always", "batch": 1, "id": "d", "calls": ref}]}
    t = derive({**d, "elapsed_s": 1.0})["targets"]["torch_always_vs_diffusers"]
    assert t["paired_median"]["b1"] == pytest.approx(0.980, abs=1e-3) and t["met"] is False
    assert t["outside_unet_s"] == {"b1": {"cfgswitch": None, "diffusers": pytest.approx(0.02)}}


def _same_unet_cells(outside_ours: float):
    # both UNets take the same time up to noise that does not line up by round; diffusers spends
    # 20 ms per call outside the UNet, ours ``outside_ours``
    unet_ref = [1.0, 1.3, 0.9, 1.2, 1.1]
    unet_ours = [1.3, 0.9, 1.2, 1.0, 1.1]
    ref = [{"total": u + 0.02, "unet": u} for u in unet_ref]
    ours = [{"total": u + outside_ours, "unet": u, "unet_cfg": u + 0.001, "unet_late": 0.0} for u in unet_ours]
    return {"cells": [{"system": "cfgswitch", "backend": "torch", "plan": "always", "batch": 1, "id": "a", "calls": ours},
                      {"system": "diffusers", "backend": "torch", "plan": "always", "batch": 1, "id": "d", "calls": ref}],
            "elapsed_s": 1.0}


def test_same_unet_ratio_counts_the_shared_unet_once_and_decides_the_target():
    t = derive(_same_unet_cells(0.015))["targets"]["torch_always_vs_diffusers"]
    # pooled UNet median 1.1 s; outside 0.02 against 0.015 s
    assert t["basis"] == "same_unet_ratio"
    assert t["same_unet_ratio"]["b1"] == pytest.approx(1.12 / 1.115) and t["met"] is True
    assert t["unet_forward_median_s"]["b1"] == {"cfgswitch": pytest.approx(1.1), "diffusers": pytest.approx(1.1)}
    # outside the UNet is total - unet (the hook-timed forward), not total - unet_cfg - unet_late
    assert t["outside_unet_s"]["b1"] == {"cfgswitch": pytest.approx(0.015), "diffusers": pytest.approx(0.02)}
    # the paired ratio of these calls is noise: per round 1.02/1.315 ... 1.32/0.915
    assert t["paired_quartiles"]["b1"][0] < 0.9 and t["paired_quartiles"]["b1"][1] > 1.1
    # 15 ms more outside the UNet than diffusers on a 1.12 s call: 1.3% slower, not met
    t = derive(_same_unet_cells(0.035))["targets"]["torch_always_vs_diffusers"]
    assert t["same_unet_ratio"]["b1"] == pytest.approx(1.12 / 1.135) and t["met"] is False
    # a call without the UNet's time: no same-UNet ratio
    assert same_unet_ratio([{"total": 1.0}], [{"total": 1.0, "unet": 0.9}]) is None
    assert same_unet_ratio([], []) is None


def test_forward_timer_sums_the_forward_calls_and_removes_its_hooks():
    import time as _time

    import torch

    class Slow(torch.nn.Linear):
        def forward(self, x):
            _time.sleep(0.02)
            return super().forward(x)

    m = Slow(2, 2)
    with forward_timer(m) as spent:
        m(torch.zeros(1, 2))
        _time.sleep(0.05)  # outside the forward: not counted
        m(torch.zeros(1, 2))
    assert 0.04 <= spent[0] < 0.09 and not m._forward_hooks and not m._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with forward_timer(m):
            raise RuntimeError("boom")
    assert not m._forward_hooks and not m._forward_pre_hooks


def test_sampler_call_on_torch_times_the_unet_forward(tiny_sampler):
    res = sampler_call(tiny_sampler, ["a red square"], [1], "switch:0.5", 4, "ddim", 7.5, 16, 16)
    t = res.timings
    # the module's forward lies inside the role calls that run it, and those inside the call
    assert 0 < t["unet"] <= t["unet_cfg"] + t["unet_late"] < t["total"]
    unet = tiny_sampler.modules["unet"]
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_rounds_reverse_every_other_time_so_no_cell_always_follows_the_same_one():
    cells = ["a", "b", "c"]
    orders = [rotate(cells, r) for r in range(6)]
    assert orders[0] == ["a", "b", "c"] and orders[1] == ["a", "c", "b"] and orders[2] == ["c", "a", "b"]
    predecessors = {c: {o[i - 1] for o in orders for i in range(1, 3) if o[i] == c} for c in cells}
    assert all(len(p) == 2 for p in predecessors.values()), predecessors
    assert all(sorted(o) == cells for o in orders) and rotate([], 3) == []


def test_ideal_speedup_of_always_is_one():
    assert ideal_speedup(30, 30, 0, 0.2, 0.1) == 1.0


# ----------------------------------------------------------------------------- quality metrics
def test_l1_and_psnr():
    ref = np.zeros((2, 4, 4, 3), np.float32)
    img = ref.copy()
    img[0] += 0.1  # MSE 0.01 -> 20 dB
    assert l1_per_image(img, ref) == pytest.approx([0.1, 0.0])
    psnr = psnr_per_image(img, ref)
    assert psnr[0] == pytest.approx(20.0) and psnr[1] is None
    c = compare(img, ref)
    assert c["psnr_mean_db"] == pytest.approx(20.0) and c["max_abs"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="images: expected shape"):
        l1_per_image(img[:1], ref)


def test_scorer_reads_rendered_scenes_perfectly():
    world = pytest.importorskip("cfgswitch.shapes.world", reason="the shapes world is not in this checkout")
    pytest.importorskip("cfgswitch.shapes.scorer", reason="the shapes scorer is not in this checkout")
    scenes = world.sample_scenes(3, 6)
    acc, why = scorer_accuracy(world.render_batch(scenes).astype(np.float32) / 255.0, scenes)
    assert why is None and acc["all_attributes"] == 1.0
    acc, why = scorer_accuracy(np.zeros((2, 16, 16, 3), np.float32), scenes)
    assert acc is None and "reads 64x64 images, these are 16x16" in why


# ----------------------------------------------------------------------------- diffusers baseline
@pytest.mark.parametrize(
    "plan, k", [("always", 10), ("switch:0.5", 5), ("switch:0.5:cond", 5), ("step:3", 3), ("switch:0.0", None),
                ("interval:0.2:0.6", None), ("adaptive:0.99", None), ("timestep:500", None)],
)
def test_baseline_switch_step(plan, k):
    assert baseline_switch_step(plan, 10) == k


def test_baseline_plans_keeps_what_diffusers_can_run():
    assert baseline_plans(["always", "switch:0.5", "interval:0.2:0.6", "adaptive:0.995"], 30) == ["always", "switch:0.5"]


def test_cutoff_callback_rejects_step_zero():
    with pytest.raises(ValueError, match="switch_step: expected >= 1"):
        CfgCutoffCallback(0, "uncond")


@pytest.mark.parametrize("plan", ["always", "switch:0.5", "switch:0.5:cond"])
def test_diffusers_baseline_matches_sampler_at_batch_2(tiny_sampler, plan):
    """The pipeline with our cutoff callback computes what the sampler computes, image for image (batch > 1)."""
    base = DiffusersBaseline(tiny_sampler.modules, tiny_sampler.scheduler_config, "ddim")
    prompts, seeds = ["a red square", "a blue circle"], [3, 4]
    timings, images = base(prompts, seeds, plan, steps=4, guidance_scale=7.5, height=16, width=16)
    ours = tiny_sampler.generate(prompts, steps=4, plan=plan, seed=seeds, output_type="np")
    assert images.shape == (2, 16, 16, 3) and set(timings) == {"total", "unet"} and 0 < timings["unet"] < timings["total"]
    # the timing hooks are gone after the call (the sampler shares this UNet)
    assert not base.pipe.unet._forward_hooks and not base.pipe.unet._forward_pre_hooks
    # Same modules, same ops in the same order: equal to float32 rounding (measured: exactly 0).
    assert np.abs(images - ours.images).max() <= 1e-6
    if plan != "always":  # and the cutoff changed the images: the test would see a callback that did nothing
        full = tiny_sampler.generate(prompts, steps=4, plan="always", seed=seeds, output_type="np")
        assert np.abs(images - full.images).max() > 1e-3
    assert math.isclose(base.pipe._guidance_scale, 0.0 if plan != "always" else 7.5)


# ----------------------------------------------------------------------------- machine
def test_scrub_paths_keeps_names_only():
    from cfgswitch.benchmarks.machine import scrub_paths

    got = scrub_paths({"a": "/home/u/models/sd", "b": ["rel/dir", "/tmp/x/bundle"], "c": 3, "d": "/"})
    assert got == {"a": ".../sd", "b": ["rel/dir", ".../bundle"], "c": 3, "d": "/"}


def test_one_thread_is_never_reduced():
    from cfgswitch.benchmarks.machine import busy_machine_threads

    assert busy_machine_threads(1) == (1, None)


def test_idle_cores_are_rounded_not_truncated():
    from cfgswitch.benchmarks.machine import busy_machine_threads, usable_cores

    cores = usable_cores()
    assert busy_machine_threads(cores, load=0.1) == (cores, None)  # a light load leaves every core idle
    if cores >= 2:
        threads, why = busy_machine_threads(cores, load=1.5)
        assert threads == max(1, cores - 1) and why.startswith("the machine was busy (1-min load average 1.5")
