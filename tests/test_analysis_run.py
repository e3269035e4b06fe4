"""The analysis experiments end to end on the tiny random model: numbers, files, CLI and scorer adapter."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from cfgswitch import GuidancePlan
from cfgswitch.analysis.analyze import AnalysisConfig, run_analysis
from cfgswitch.analysis.eos import eos_experiments
from cfgswitch.analysis.probes import trajectory_probes
from cfgswitch.analysis.recommend import Tolerance
from cfgswitch.analysis.scoring import generic_prompt_set
from cfgswitch.analysis.sweep import switch_sweep
from cfgswitch.analysis.trajectory import encode_texts, guided_trajectory
from cfgswitch.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def test_guided_trajectory_reproduces_sampler_always(tiny_sampler):
    prompts, seeds = ["a red fox", "a blue car"], [5, 9]
    ref = tiny_sampler.generate(prompts, steps=4, plan="always", seed=seeds, scheduler="euler", output_type="latent")
    cond, uncond = encode_texts(tiny_sampler, prompts), encode_texts(tiny_sampler, ["", ""])
    seen = []
    lat = guided_trajectory(tiny_sampler, uncond, cond, seeds, steps=4, guidance_scale=7.5, scheduler="euler",
                            observer=lambda s: seen.append((s.index, s.alpha_bar)))
    torch.testing.assert_close(lat, ref.latents, atol=1e-6, rtol=0)  # same pieces, same order of operations
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    alphas = [a for _, a in seen]
    assert alphas == sorted(alphas) and 0 < alphas[0] < alphas[-1] < 1  # noisiest first


def test_switching_cond_at_step_zero_equals_running_b(tiny_sampler):
    a, b = encode_texts(tiny_sampler, ["a red fox"]), encode_texts(tiny_sampler, ["a lighthouse"])
    u = encode_texts(tiny_sampler, [""])
    kw = dict(steps=3, guidance_scale=5.0, scheduler="ddim")
    full_b = guided_trajectory(tiny_sampler, u, b, [1], **kw)
    from_0 = guided_trajectory(tiny_sampler, u, a, [1], cond_after=b, switch_cond_at=0, **kw)
    never = guided_trajectory(tiny_sampler, u, a, [1], cond_after=b, switch_cond_at=3, **kw)
    only_a = guided_trajectory(tiny_sampler, u, a, [1], **kw)
    assert torch.equal(full_b, from_0) and torch.equal(never, only_a)
    assert not torch.equal(full_b, only_a)


def test_probes_numbers(tiny_sampler):
    res = trajectory_probes(tiny_sampler, ["a red fox", "a blue car", "a cat"], steps=5, seed=2, batch_size=2)
    ps = res["per_step"]
    assert res["seeds"] == [2, 3, 4] and len(res["timesteps"]) == 5
    assert all(len(v) == 5 for v in ps.values())
    assert ps["change_low"][0] is None and all(c >= 0 for c in ps["change_low"][1:])
    assert ps["distance_to_final_low"][-1] == 0.0 and ps["distance_to_final_high"][-1] == 0.0
    assert all(-1.0 <= c <= 1.0 for c in ps["cosine"]) and all(m <= c + 1e-12 for m, c in zip(ps["cosine_min"], ps["cosine"]))
    assert all(d > 0 for d in ps["guidance_delta_rms"])  # prompts differ from the empty prompt
    assert 0 <= res["settle_step"]["low"] <= 5 and len(res["settle_steps_per_image"]["high"]) == 3
    px = res["pixel"]["per_step"]
    assert px["distance_to_final_low"][-1] == 0.0 and len(px["energy_high"]) == 5
    # the parts of a decoded image in [0, 1]: energies add up to at most 1 (Parseval)
    assert all(0 <= lo + hi <= 1 for lo, hi in zip(px["energy_low"], px["energy_high"]))
    latent_only = trajectory_probes(tiny_sampler, ["a red fox"], steps=5, seed=2, pixels=False)
    assert "pixel" not in latent_only
    assert latent_only["per_step"]["cosine"][0] == pytest.approx(ps["cosine"][0] * 3 - sum(
        trajectory_probes(tiny_sampler, [p], steps=5, seed=s, pixels=False)["per_step"]["cosine"][0]
        for p, s in (("a blue car", 3), ("a cat", 4))), abs=1e-6)  # per-image values do not depend on the batch (float32 UNet)


def test_sweep_accounting(tiny_sampler):
    res = switch_sweep(tiny_sampler, ["a", "b"], fractions=(0.0, 0.5, 1.0), late_modes=("uncond", "cond"), steps=4,
                       batch_size=2)
    by = {(e["late"], e["fraction"]): e for e in res["entries"]}
    assert res["baseline"]["unet_rows"] == 2 * 2 * 4
    for late in ("uncond", "cond"):
        assert by[(late, 0.0)]["rows_saved"] == pytest.approx(0.5) and by[(late, 0.5)]["rows_saved"] == pytest.approx(0.25)
        full = by[(late, 1.0)]  # always-CFG again: identical images
        assert full["l1"] == 0.0 and full["lowfreq"] == 0.0 and full["psnr"] == 100.0 and full["rows_saved"] == 0.0
        assert by[(late, 0.0)]["l1"] > 0
    assert by[("uncond", 0.5)]["plan"] == "switch:0.5" and by[("cond", 0.5)]["plan"] == "switch:0.5:cond"
    assert [by[("uncond", f)]["switch_step"] for f in (0.0, 0.5, 1.0)] == [0, 2, 4]
    timing = res["unet_timing"]
    assert timing["batch"] == 2 and timing["cfg_call_seconds"] > 0 and timing["late_call_seconds"] > 0
    gain = 1 - timing["late_call_seconds"] / timing["cfg_call_seconds"]
    assert by[("cond", 0.0)]["unet_time_saved"] == pytest.approx(gain) and by[("cond", 0.5)]["unet_time_saved"] == pytest.approx(gain / 2)
    assert by[("uncond", 1.0)]["unet_time_saved"] == 0.0


def test_eos_variants_are_consistent(tiny_sampler):
    res = eos_experiments(tiny_sampler, [("a red fox in the snow", "a lighthouse"), ("a cat", "a bowl of apples")],
                          steps=3, k_grid=(0, 1, 3), batch_size=4)
    v = res["variants"]
    assert v["a"]["toward_b"] == 0.0 and v["b"]["toward_b"] == 1.0
    assert 0.0 <= v["eos_from_b"]["toward_b"] <= 1.0 and 0.0 <= v["semantic_from_b"]["toward_b"] <= 1.0
    prompt_curve = {c["k"]: c["toward_b"] for c in res["step_k"]["prompt"]}
    assert prompt_curve[0] == 1.0 and prompt_curve[3] == 0.0  # k = 0: all B; k = steps: A
    eos_curve = {c["k"]: c["toward_b"] for c in res["step_k"]["eos"]}
    assert eos_curve[0] == v["eos_from_b"]["toward_b"] and eos_curve[3] == 0.0
    assert res["eos_positions"]["a"] == [7, 3]  # <start> a red fox in the snow <end>: first [EOS] at 7
    assert res["no_effect_from_step"]["prompt"] in (1, 3)


@pytest.mark.slow
def test_run_analysis_writes_everything(tiny_sampler, tmp_path):
    cfg = AnalysisConfig(steps=4, probe_prompts=2, sweep_prompts=2, eos_pairs=2, fractions=(0.0, 0.5, 1.0),
                         k_grid=(0, 2, 4), batch_size=8, tolerance=Tolerance(lowfreq=0.05))
    res = run_analysis(tiny_sampler, generic_prompt_set(2, 2), tmp_path, cfg, model_name="tiny", progress=False)
    for name in ("analysis.json", "recommendation.json", "report.md", "frequency.png", "guidance.png", "sweep.png",
                 "eos.png", "sweep_examples.png", "eos_examples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    from PIL import Image

    # one row of 16 px images per distinct plan of (always, recommended, switch at 0), 2 px apart, enlarged 8x
    rows = len({"always", res["recommendation"]["plan"], "switch:0"})
    assert Image.open(tmp_path / "sweep_examples.png").size[1] == rows * 18 * 8
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["schema_version"] == 1
    assert set(data) >= {"model", "config", "probes", "sweep", "eos", "recommendation", "plots", "elapsed_seconds"}
    assert "_images" not in data["sweep"] and "_images" not in data["eos"]
    assert len(data["sweep"]["entries"]) == 6 and data["config"]["tolerance"] == {"lowfreq": 0.05, "accuracy_points": 1.0}
    rec = json.loads((tmp_path / "recommendation.json").read_text())
    assert rec == data["recommendation"] == json.loads(json.dumps(res["recommendation"]))
    plan = GuidancePlan.parse(rec["plan"])  # the form generate / bench / serve accept
    assert str(plan) == rec["plan"]
    # the adaptive recommendation: a plan that parses, checked on the sweep's prompts
    ad = rec["adaptive"]
    assert rec["adaptive_plan"] == ad["plan"] and str(GuidancePlan.parse(ad["plan"])) == ad["plan"]
    if ad["plan"] != "always":
        assert ad["threshold"] == math.floor(data["probes"]["per_step"]["cosine"][ad["from_step"]] * 1e4) / 1e4
        assert ad["min_fraction"] == rec["fraction"] and ad["late"] == rec["late"]
        assert 0.0 <= ad["rows_saved"] <= 0.5 and ad["lowfreq"] >= 0 and isinstance(ad["within_tolerance"], bool)
    report = (tmp_path / "report.md").read_text()
    assert "## Answers" in report and f"`{rec['plan']}`" in report and "![" in report
    assert str(tmp_path) not in report  # no machine paths in a report meant to be committed


@pytest.mark.slow
def test_cli_runs_and_refuses_bad_input(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["analyze", "--model", str(tiny_model_dir), "--steps", "3", "--probe-prompts", "2", "--sweep-prompts", "2",
                 "--pairs", "1", "--fractions", "0,1", "--late-modes", "uncond", "--k-grid", "0,1,3", "--k-modes", "prompt",
                 "--threads", "1", "--no-progress", "--no-save", "--out", str(out)])
    assert code == 0
    assert not (tiny_model_dir / "cfgswitch.json").exists()  # --no-save: the shared fixture stays as it was
    data = json.loads((out / "analysis.json").read_text())
    assert data["config"]["fractions"] == [0.0, 1.0] and list(data["eos"]["step_k"]) == ["prompt"]
    assert data["scorer"].startswith("the model is not the embedded shapes model")
    # cheap arguments are checked before the (missing) model is touched
    missing = str(tmp_path / "no-model")
    assert main(["analyze", "--model", missing, "--fractions", "0,1.5", "--out", str(out)]) == 2
    assert "fractions: expected switch fractions in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["analyze", "--model", missing, "--experiments", "probes,magic", "--out", str(out)]) == 2
    assert "experiments: expected a non-empty subset of probes, sweep, eos" in capsys.readouterr().err
    assert main(["analyze", "--model", missing, "--prompts", missing, "--out", str(out)]) == 2
    assert "prompts: expected an existing text file" in capsys.readouterr().err
    assert main(["analyze", "--model", missing, "--out", str(out)]) == 2
    assert "model: expected an existing diffusers folder" in capsys.readouterr().err
    if importlib.util.find_spec("cfgswitch.shapes.scorer") is not None:
        assert main(["analyze", "--model", str(tiny_model_dir), "--scorer", "shapes", "--out", str(out)]) == 2
        assert "scorer: expected a model that makes 64x64 images" in capsys.readouterr().err


def test_shapes_scorer_adapter_on_clean_renders():
    shapes = pytest.importorskip("cfgswitch.shapes.scorer", reason="cfgswitch.shapes is built by another issue")
    del shapes
    from cfgswitch.analysis.scoring import ShapesScorer, shapes_prompt_set
    from cfgswitch.shapes.world import render

    ps = shapes_prompt_set(6, 4)
    assert len(ps.prompts) == len(ps.scenes) == 6 and len(ps.pairs) == len(ps.pair_scenes) == 4
    for (a, b), (sa, sb) in zip(ps.pairs, ps.pair_scenes):
        oa, ob = sa.objects[0], sb.objects[0]
        assert sa.background != sb.background and all(getattr(oa, k) != getattr(ob, k) for k in ("colour", "shape", "size", "position"))
        assert oa.colour in a and ob.colour in b
    scorer = ShapesScorer()
    images = np.stack([render(s) for s in ps.scenes])
    acc = scorer.accuracy(images, ps.scenes)
    assert set(acc) == {"colour", "shape", "size", "position", "background", "mean"}
    assert acc["colour"] == 100.0 and acc["background"] == 100.0 and acc["mean"] >= 95.0
    imgs_a = np.stack([render(sa) for sa, _ in ps.pair_scenes])
    assert scorer.match_share(imgs_a, [sa for sa, _ in ps.pair_scenes]) >= 0.95
    assert scorer.match_share(imgs_a, [sb for _, sb in ps.pair_scenes]) <= 0.05  # every attribute differs
    shares = scorer.match_shares(imgs_a, [sa for sa, _ in ps.pair_scenes])
    assert shares["colour"] == 1.0 and shares["background"] == 1.0


@pytest.mark.slow
def test_scored_run_on_a_64px_model(tmp_path):
    pytest.importorskip("cfgswitch.shapes.scorer", reason="cfgswitch.shapes is built by another issue")
    from cfgswitch import Sampler
    from cfgswitch.analysis.scoring import ShapesScorer, shapes_prompt_set
    from cfgswitch.tiny_model import tiny_pipeline

    sampler = Sampler.from_diffusers(tiny_pipeline(seed=0, sample_size=32))  # 64 px images, as the scorer reads
    cfg = AnalysisConfig(steps=2, probe_prompts=1, sweep_prompts=2, eos_pairs=1, fractions=(0.0, 1.0),
                         late_modes=("uncond",), k_grid=(0, 2), k_modes=("eos",), experiments=("sweep", "eos"))
    res = run_analysis(sampler, shapes_prompt_set(2, 1), tmp_path, cfg, scorer=ShapesScorer(), scorer_note="shapes",
                       progress=False)
    sweep = res["sweep"]
    assert sweep["scored"] and set(sweep["baseline"]["accuracy"]) == {"colour", "shape", "size", "position", "background", "mean"}
    same = next(e for e in sweep["entries"] if e["fraction"] == 1.0)
    assert same["accuracy"] == sweep["baseline"]["accuracy"]  # identical images, identical scores
    assert res["recommendation"]["scored"] and res["recommendation"]["accuracy_drop_points"] is not None
    v = res["eos"]["variants"]
    assert all(0.0 <= v[k]["matches_b"] <= 1.0 and 0.0 <= v[k]["matches_a"] <= 1.0 for k in v)
    assert res["eos"]["scorer_separates_pairs"] in (True, False)
    assert res["eos"]["no_effect_from_step_scored"] is None or set(res["eos"]["no_effect_from_step_scored"]) == {"eos"}
    by_attr = v["eos_from_b"]["matches_b_by_attribute"]
    assert set(by_attr) == {"colour", "shape", "size", "position", "background", "mean"}
    assert by_attr["mean"] == pytest.approx(np.mean([by_attr[a] for a in ("colour", "shape", "size", "position", "background")]))
    report = (tmp_path / "report.md").read_text()
    assert "accuracy % (mean / colour / shape / size / position / background)" in report and "matches B" in report
    assert "Per attribute (share of images whose attribute matches A / B)" in report


@pytest.mark.slow
def test_cli_saves_recommendations_and_auto_uses_them(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"  # a folder of its own (the parts linked), so the shared fixture stays clean
    model.mkdir()
    for part in tiny_model_dir.iterdir():
        (model / part.name).symlink_to(part)
    code = main(["analyze", "--model", str(model), "--steps", "4", "--probe-prompts", "2", "--sweep-prompts", "2",
                 "--experiments", "probes,sweep", "--fractions", "0,0.5,1", "--late-modes", "cond",
                 "--lowfreq-tolerance", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path / "a")])
    assert code == 0
    saved = json.loads((model / "cfgswitch.json").read_text())
    rec = json.loads((tmp_path / "a" / "recommendation.json").read_text())
    # tolerance 1: every fraction qualifies, the earliest (0, cond) wins
    assert saved["recommended_plan"] == rec["plan"] == "switch:0:cond"
    assert saved["recommended_adaptive_plan"] == rec["adaptive_plan"]
    assert saved["evidence"]["adaptive"]["threshold"] == rec["adaptive"]["threshold"]
    out = tmp_path / "gen"
    assert main(["generate", "x", "--model", str(model), "--steps", "4", "--plan", "auto", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["plan"] == "switch:0:cond"
