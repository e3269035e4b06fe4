"""The GPU suite: full-size configs checked on the meta device, and its --dry-run end to end on a CPU."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from cfgswitch.benchmarks import gpu_models
from cfgswitch.benchmarks.gpu_suite import main


def test_full_size_configs_have_the_published_parameter_counts():
    # SD 1.5 UNet: 859,520,964 parameters; SDXL base UNet: 2,567,463,684 (counted without allocating memory).
    assert gpu_models.count_parameters(gpu_models.SD15_UNET) == 859_520_964
    assert gpu_models.count_parameters(gpu_models.SDXL_UNET) == 2_567_463_684


def test_sdxl_cell_runs_the_runtime_with_added_conditioning():
    """The SDXL cell's UNet gets text_embeds and time_ids through the runtime's own runner, as diffusers' UNet takes them."""
    from cfgswitch.conditioning import TEXT, Conditioning
    from cfgswitch.runners.torch_runners import TorchGuidedUNet, TorchUNet

    unet = gpu_models.build_unet(gpu_models.TINY_SDXL_UNET, torch.device("cpu"), torch.float32)
    added = gpu_models.added_conditioning(32, 3, 64, 64, torch.device("cpu"), torch.float32)
    assert added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3
    assert added["text_embeds"].shape == (3, 32)
    assert gpu_models.added_conditioning(None, 3, 64, 64, torch.device("cpu"), torch.float32) == {}
    x, u, c = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32), torch.randn(3, 77, 32)
    cond = Conditioning({TEXT: u, **added}, {TEXT: c, **added})
    both = cond.both()
    t = torch.full((3,), 500.0)
    runner = TorchGuidedUNet(TorchUNet(unet))
    pair = runner.predict_pair(x, t, both[TEXT], {k: v for k, v in both.items() if k != TEXT})
    with torch.no_grad():
        ref = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([u, c]),
                   added_cond_kwargs={"text_embeds": torch.cat([added["text_embeds"]] * 2),
                                      "time_ids": torch.cat([added["time_ids"]] * 2)}).sample
    assert torch.allclose(pair, ref, atol=1e-6, rtol=0)


def test_full_run_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full suite would run")
    assert main(["--out", "unused"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_writes_result_files(tmp_path):
    out = tmp_path / "gpu"
    code = main(["--dry-run", "--models", "sd15,sdxl", "--batch", "1", "--variants", "diffusers,eager,graphs",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    for model in ("sd15", "sdxl"):
        r = json.loads((out / model / "results.json").read_text())
        assert r["kind"] == "cfgswitch-gpu-suite" and r["config"]["dry_run"] is True
        ids = sorted(c["id"] for c in r["cells"])
        assert ids == sorted(f"{s}/torch-eager/{p}/b1" for s in ("cfgswitch", "diffusers") for p in ("always", "switch:0.5"))
        assert any("variant graphs needs CUDA" in n for n in r["notes"])
        sw = r["derived"]["cells"]["cfgswitch/torch-eager/switch:0.5/b1"]
        always = r["derived"]["cells"]["cfgswitch/torch-eager/always/b1"]
        assert sw["realized_speedup"] == pytest.approx(always["total_median_s"] / sw["total_median_s"], rel=1e-12)
        (role,) = [e for e in r["role_costs"] if e["backend"] == "torch-eager"]
        c, late = statistics.median(role["cfg_s"]), statistics.median(role["late_s"])
        assert sw["ideal_speedup"] == pytest.approx(2 * c / (c + late), rel=1e-12)  # 1 cfg + 1 late step of 2
        assert (out / model / "report.md").read_text().startswith("# cfgswitch benchmark: random-weight")
        assert (out / model / "speed.png").is_file()
