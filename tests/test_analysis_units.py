"""Unit tests of the analysis building blocks: FFT split, distances, x0, token composites, recommendation rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfgswitch import GuidancePlan, InvalidArgumentError
from cfgswitch.analysis.eos import _first_stable_below, compose, default_k_grid
from cfgswitch.analysis.frequency import band_energy, low_pass_mask, relative_change, split_frequencies
from cfgswitch.analysis.metrics import PSNR_CAP_DB, l1_distance, lowfreq_distance, psnr, toward_b
from cfgswitch.analysis.probes import settle_step
from cfgswitch.analysis.recommend import Tolerance, earliest_within, recommend
from cfgswitch.analysis.trajectory import predicted_x0


def _grid(n: int):
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    return y, x


# ----------------------------------------------------------------------------- frequency split
def test_pure_low_frequency_signal_has_no_high_energy():
    y, x = _grid(16)
    # 1 cycle per 16 px = 0.0625 cycles/px, under the default cutoff 0.25 * 0.5 = 0.125
    signal = (torch.cos(2 * math.pi * x / 16) + 0.5 * torch.sin(2 * math.pi * y / 16) + 0.3)[None, None]
    low, high = split_frequencies(signal)
    assert high.abs().max().item() < 1e-12
    e_low, e_high = band_energy(signal)
    assert e_high.item() < 1e-24
    assert e_low.item() == pytest.approx(0.5 + 0.125 + 0.09, rel=1e-12)  # mean squares of the three terms


def test_pure_high_frequency_signal_has_no_low_energy():
    y, x = _grid(16)
    checker = ((-1.0) ** (x + y))[None, None]  # Nyquist in both axes: radius 0.707 cycles/px
    e_low, e_high = band_energy(checker)
    assert e_low.item() < 1e-24
    assert e_high.item() == pytest.approx(1.0, rel=1e-12)


def test_split_is_exact_and_energy_adds_up():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 12, generator=g)
    low, high = split_frequencies(x, cutoff=0.4)
    torch.testing.assert_close(low + high, x.double(), atol=1e-12, rtol=0)
    e_low, e_high = band_energy(x, cutoff=0.4)
    total = x.double().reshape(3, -1).pow(2).mean(1)
    torch.testing.assert_close(e_low + e_high, total, atol=1e-10, rtol=0)  # Parseval: the parts are orthogonal


def test_mask_bins_and_extremes():
    # 16x16: radius <= 0.125 cycles/px is |(i, j)| <= 2 in units of 1/16: 13 integer points
    assert int(low_pass_mask(16, 16).sum()) == 13
    only_dc = low_pass_mask(8, 8, cutoff=0.0)
    assert int(only_dc.sum()) == 1 and bool(only_dc[0, 0])
    assert bool(low_pass_mask(8, 8, cutoff=1.5).all())


def test_bad_cutoff_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"cutoff: expected a fraction of the Nyquist frequency in \[0, 1.5\], got 2.0"):
        low_pass_mask(8, 8, cutoff=2.0)
    with pytest.raises(InvalidArgumentError, match=r"x: expected a tensor with at least 2 dimensions"):
        split_frequencies(torch.zeros(5))


def test_relative_change():
    a = torch.ones(2, 3, 4)
    b = torch.stack([torch.ones(3, 4) * 2, torch.ones(3, 4)])
    torch.testing.assert_close(relative_change(a, b), torch.tensor([0.5, 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- image distances
def test_image_distances_known_values():
    a = np.zeros((2, 16, 16, 3))
    b = a.copy()
    b[0] += 0.1  # uniform offset: all low frequency
    y, x = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    b[1] += (0.1 * (-1.0) ** (x + y))[..., None]  # checkerboard: all high frequency
    np.testing.assert_allclose(l1_distance(a, b), [0.1, 0.1], atol=1e-12)
    np.testing.assert_allclose(psnr(a, b), [20.0, 20.0], atol=1e-9)  # 10 log10(1 / 0.01)
    np.testing.assert_allclose(lowfreq_distance(a, b), [0.1, 0.0], atol=1e-12)
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    with pytest.raises(InvalidArgumentError, match=r"images: expected two arrays of one shape"):
        l1_distance(a, b[:1])


def test_toward_b_is_a_position_between_a_and_b():
    a = np.zeros((3, 8, 8, 3))
    b = np.ones((3, 8, 8, 3))
    img = np.stack([a[0], b[0], np.full((8, 8, 3), 0.25)])
    np.testing.assert_allclose(toward_b(img, a, b), [0.0, 1.0, 0.25], atol=1e-12)
    assert toward_b(a[:1], a[:1], a[:1]).tolist() == [0.5]  # A and B coincide


# ----------------------------------------------------------------------------- x0 and settling
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_recovers_clean_latent(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = 0.3
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    output = {"epsilon": eps, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(predicted_x0(xt, output, a, prediction_type), x0.double(), atol=1e-6, rtol=0)


def test_settle_step_needs_the_tail_to_stay_below():
    assert settle_step([0.5, 0.05, 0.2, 0.08, 0.0], 0.1) == 3  # the dip at index 1 does not count
    assert settle_step([0.05, 0.0], 0.1) == 0
    assert settle_step([0.5, 0.3], 0.1) == 2
    assert _first_stable_below([0.9, 0.05, 0.2, 0.0], [0, 2, 4, 8], 0.1) == 8
    assert _first_stable_below([0.9, 0.5], [0, 4], 0.1) is None


# ----------------------------------------------------------------------------- token composites
def test_compose_keeps_length_and_takes_each_part_from_its_source():
    length, width = 10, 3
    a = torch.arange(length * width, dtype=torch.float32).reshape(length, width)
    b = -torch.arange(1, length * width + 1, dtype=torch.float32).reshape(length, width)
    # A's words end at 4 (EOS at 4), B's EOS at 6: B's [EOS] part is rows 6..9 (4 rows), 6 are needed
    out = compose(a, 4, b, 6)
    assert out.shape == (length, width)
    torch.testing.assert_close(out[:4], a[:4])
    torch.testing.assert_close(out[4:8], b[6:10])
    torch.testing.assert_close(out[8:], b[9:10].expand(2, width))  # padded with B's last row
    # longer semantic part: truncated at the length
    out2 = compose(b, 6, a, 4)
    torch.testing.assert_close(out2[:6], b[:6])
    torch.testing.assert_close(out2[6:], a[4:8])


def test_default_k_grid():
    assert default_k_grid(30) == [0, 2, 3, 4, 6, 9, 12, 15, 21, 30]
    assert default_k_grid(4) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- recommendation rule
def _sweep(lowfreq_by_mode, accuracy_by_mode=None, baseline_acc=None, steps=20):
    entries = []
    for late, values in lowfreq_by_mode.items():
        for f, lf in values.items():
            k = int(math.floor(f * steps + 0.5))
            e = {"plan": str(GuidancePlan.switch_at(f, late)), "fraction": f, "late": late, "switch_step": k,
                 "lowfreq": lf, "psnr": 30.0, "rows_saved": (steps - k) / (2 * steps), "time_saved": 0.1}
            if accuracy_by_mode is not None:
                e["accuracy"] = {"mean": accuracy_by_mode[late][f]}
            entries.append(e)
    base = {"plan": "always"}
    if baseline_acc is not None:
        base["accuracy"] = {"mean": baseline_acc}
    return {"entries": entries, "baseline": base, "steps": steps, "scheduler": "ddim", "guidance_scale": 7.5,
            "scored": accuracy_by_mode is not None}


def test_recommend_earliest_stable_fraction():
    sweep = _sweep({"uncond": {0.0: 0.2, 0.2: 0.01, 0.4: 0.05, 0.6: 0.02, 1.0: 0.0},
                    "cond": {0.0: 0.2, 0.2: 0.1, 0.4: 0.04, 0.6: 0.01, 1.0: 0.0}})
    rec = recommend(sweep, Tolerance(lowfreq=0.03))
    # uncond: 0.2 is within, but 0.4 is not, so 0.6; cond: 0.6 as well -> tie goes to uncond
    assert rec["plan"] == "switch:0.6" and rec["late"] == "uncond" and rec["switch_step"] == 12
    assert rec["rows_saved"] == pytest.approx(0.2)
    assert GuidancePlan.parse(rec["plan"]) == GuidancePlan.switch_at(0.6, "uncond")
    assert rec["earliest_per_late_mode"] == {"uncond": "switch:0.6", "cond": "switch:0.6:cond"}
    rec2 = recommend(sweep, Tolerance(lowfreq=0.045))  # cond reaches 0.4 first now
    assert rec2["plan"] == "switch:0.4:cond"
    assert GuidancePlan.parse(rec2["plan"]) == GuidancePlan.switch_at(0.4, "cond")


def test_recommend_applies_the_accuracy_bound():
    lowfreq = {"uncond": {0.2: 0.0, 0.4: 0.0, 0.6: 0.0, 1.0: 0.0}}
    acc = {"uncond": {0.2: 80.0, 0.4: 88.5, 0.6: 90.5, 1.0: 90.0}}
    rec = recommend(_sweep(lowfreq, acc, baseline_acc=90.0), Tolerance(lowfreq=0.03, accuracy_points=1.0))
    assert rec["plan"] == "switch:0.6" and rec["accuracy_drop_points"] == pytest.approx(-0.5)
    rec = recommend(_sweep(lowfreq, acc, baseline_acc=90.0), Tolerance(lowfreq=0.03, accuracy_points=1.5))
    assert rec["plan"] == "switch:0.4" and rec["accuracy_drop_points"] == pytest.approx(1.5)
    # each criterion alone: the distances allow 0.2, the accuracy only 0.4
    assert rec["earliest_per_criterion"] == {"lowfreq_only": "switch:0.2", "accuracy_only": "switch:0.4"}


def test_recommend_always_when_nothing_qualifies():
    rec = recommend(_sweep({"uncond": {0.0: 0.5, 0.5: 0.2, 1.0: 0.0}}), Tolerance(lowfreq=0.01))
    assert rec["plan"] == "always" and rec["late"] is None and rec["rows_saved"] == 0.0
    assert GuidancePlan.parse(rec["plan"]) == GuidancePlan.always()
    entries = _sweep({"uncond": {0.0: 0.5, 1.0: 0.0}})
    assert earliest_within(entries["entries"], entries["baseline"], Tolerance())["fraction"] == 1.0


def test_tolerance_is_checked():
    with pytest.raises(InvalidArgumentError, match=r"tolerance.lowfreq: expected a number >= 0, got -0.1"):
        Tolerance(lowfreq=-0.1)
    with pytest.raises(InvalidArgumentError, match=r"tolerance.accuracy_points: expected a number >= 0"):
        Tolerance(accuracy_points=float("nan"))


def test_recommend_adaptive_threshold_and_minimum():
    from cfgswitch.analysis.recommend import recommend_adaptive

    probes = {"per_step": {"cosine": [0.99649, 0.99896, 0.99948, 0.99959, 0.99972, 0.99979, 0.99981]}}
    rec = recommend(_sweep({"cond": {0.0: 0.2, 0.2: 0.02, 0.5: 0.01, 1.0: 0.0}}, steps=30), Tolerance(lowfreq=0.03))
    assert (rec["plan"], rec["switch_step"]) == ("switch:0.2:cond", 6)
    ad = recommend_adaptive(probes, rec)
    # the mean cosine at step 5 (the last guided step of switch:0.2 of 30) is 0.99979 -> 0.9997
    assert ad["threshold"] == 0.9997 and ad["from_step"] == 5 and ad["min_fraction"] == 0.2 and ad["late"] == "cond"
    assert ad["plan"] == "adaptive:0.9997:min=0.2:cond"
    plan = GuidancePlan.parse(ad["plan"])
    assert not plan.should_switch(1.0, 4, 30) and plan.should_switch(0.9997, 5, 30)  # never before step 6
    # always recommended: so is the adaptive plan; no probes: no adaptive recommendation
    assert recommend_adaptive(probes, recommend(_sweep({"uncond": {0.0: 0.5, 1.0: 0.0}}), Tolerance(lowfreq=0.01)))["plan"] == "always"
    assert recommend_adaptive(None, rec) is None
