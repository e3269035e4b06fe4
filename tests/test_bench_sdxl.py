"""``cfgswitch bench`` on a tiny SDXL folder: the runtime against diffusers' ``StableDiffusionXLPipeline``.

The baseline runs diffusers' SDXL pipeline on the very modules the sampler runs, with a
CFG cutoff that halves ``prompt_embeds``, ``add_text_embeds`` and ``add_time_ids`` (diffusers'
own SDXL cutoff keeps ``[-1:]``, one row, wrong at batch > 1). The images must agree: 1e-5
(both sides run the same modules in the same order; the figure measured here is 0).
"""

from __future__ import annotations

import json

import pytest

from cfgswitch.cli import main


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from cfgswitch.tiny_model import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def test_bench_runs_sdxl_against_its_diffusers_pipeline(sdxl_folder, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(sdxl_folder), "--backend", "torch", "--batch", "2", "--repeat", "1", "--warmup", "0",
                 "--steps", "2", "--plans", "switch:0.5", "--role-repeat", "1", "--threads", "1", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    parity = r["quality"]["parity"]
    assert sorted(parity) == ["diffusers/torch/always/b2", "diffusers/torch/switch:0.5/b2"]
    for entry in parity.values():
        assert entry["max_abs"] <= 1e-5  # batch 2: the cutoff is batch-correct for SDXL's added conditioning
    cells = {c["id"]: c for c in r["cells"]}
    switch = cells["cfgswitch/torch/switch:0.5/b2"]
    assert (switch["cfg_steps"], switch["late_steps"], switch["unet_rows"]) == (1, 1, 6)
    (role,) = [e for e in r["role_costs"] if e["batch"] == 2]
    assert role["cfg_s"] and role["late_s"]  # the role calls ran with text_embeds and time_ids
