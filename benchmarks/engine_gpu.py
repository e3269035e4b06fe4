"""The step engine's GPU cell: the serving suite on an SD 1.5-size random UNet, fp16, CUDA graphs.

Speed does not depend on weight values, so the UNet is the real SD 1.5 architecture with
random weights (:data:`cfgswitch.benchmarks.gpu_models.SD15_UNET`); the text encoder and VAE
are small random stand-ins of the right widths (their cost is not what is measured). The UNet
runs under one CUDA graph per row bucket (``mode="graphs"``, the engine pads every call to
1, 2, 4, 8, ... rows), so a call's cost is the GPU's, not the host's.

Run on a GPU host::

    python -m cfgswitch.benchmarks.engine_gpu --out benchmarks/results/gpu-serving

``--dry-run`` runs the same code on the CPU with tiny configs and eager torch (it checks the
script, not the speed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)


def build_sampler(device: torch.device, dtype: torch.dtype, tiny: bool, mode: str):
    """A :class:`~cfgswitch.Sampler` over a random SD 1.5-size UNet (tiny stand-ins with ``tiny``)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from cfgswitch.runners.torch_runners import torch_runners
    from cfgswitch.sampler import Sampler, spec_from_modules
    from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG
    from cfgswitch.tokenizer import load_clip_tokenizer

    from .gpu_models import SD15_UNET, TINY_SD15_UNET, build_unet

    cfg = TINY_SD15_UNET if tiny else SD15_UNET
    unet = build_unet(cfg, device, dtype)
    width = int(cfg["cross_attention_dim"])
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                                                num_attention_heads=8 if width % 8 == 0 else 4, vocab_size=49408,
                                                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                                pad_token_id=49407))
    blocks = 2 if tiny else 4  # VAE factor 2 (tiny, 16 px) or 8 (512 px)
    vae = AutoencoderKL(block_out_channels=(32,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, norm_num_groups=32)
    for m in (text_encoder, vae):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = load_clip_tokenizer()
    spec = spec_from_modules(unet, vae, text_encoder, tokenizer, "sd15-random" if not tiny else "tiny-random")
    runners = torch_runners(text_encoder, unet, vae, device, dtype, mode=mode)
    return Sampler(runners, tokenizer, dict(SD_SCHEDULER_CONFIG), spec, source=spec.name)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-serving", help="output folder")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU, eager torch")
    p.add_argument("--rates", default="0.5,0.7,1.0,1.5", help="offered loads as fractions of the estimated saturation")
    p.add_argument("--requests", type=int, default=48, help="requests per system and rate")
    p.add_argument("--request-steps", default="20,30", help="steps drawn per request")
    p.add_argument("--max-rows", type=int, default=16, help="step engine: rows per call at most")
    p.add_argument("--max-batch", type=int, default=8, help="request batching: images per batch at most")
    p.add_argument("--max-minutes", type=float, default=6.0, help="stop adding rates once the run has taken this long")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the cell and write ``serving.json``, ``serving.md`` and ``serving.png`` into ``--out``."""
    from .config import parse_float_list, parse_int_list
    from .engine_bench import EngineBenchConfig, plot, report_lines, run_engine_bench
    from .machine import machine_info

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    sampler = build_sampler(device, dtype, tiny=not cuda, mode="graphs" if cuda else "eager")
    rates = parse_float_list("rates", args.rates)
    cfg = EngineBenchConfig(rates=rates, count=args.requests, steps=parse_int_list("request-steps", args.request_steps),
                            max_rows=args.max_rows, max_batch=args.max_batch, row_buckets=True)
    prompts = [f"a photo of object {i}" for i in range(64)]
    start = time.perf_counter()
    results = run_engine_bench(sampler, cfg, prompts, deadline=start + 60 * args.max_minutes,
                               progress=lambda r: logger.info("%s load %.2f: %.2f img/s p99 %.2f s", r["system"],
                                                              r["rate_fraction"], r["throughput_img_s"],
                                                              r["latency_s"]["p99"]))
    results.update(machine=machine_info(), device=str(device), dtype=str(dtype), mode=sampler.runners.info.get("mode"),
                   elapsed_s=time.perf_counter() - start, load_average=list(os.getloadavg()), dry_run=not cuda)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=1, default=str))
    title = "# GPU serving cell: step engine, SD 1.5-size random UNet, fp16, CUDA graphs per row bucket"
    (out / "serving.md").write_text("\n".join([title, ""] + report_lines(results)) + "\n")
    plot(results, out / "serving.png")
    print("\n".join(report_lines(results)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
