"""Measure "weights once": bundle size on disk and resident memory of a loaded ONNX Runtime sampler.

On the SD 1.5-size random UNet (``cfgswitch.benchmarks.gpu_models.SD15_UNET``, fp32, 512 px,
64x64 latents) with a tiny text encoder (width 768) and a tiny VAE (factor 8): the UNet
dominates. Three steps, each a separate process so memory figures do not mix:

    python tools/measure_weights.py export /tmp/w/shared          # the bundle as the exporter writes it now
    python tools/measure_weights.py unshare /tmp/w/shared /tmp/w/old   # the old layout: one .onnx.data per UNet graph
    python tools/measure_weights.py rss /tmp/w/old --sessions plain    # the ORT sampler as it was
    python tools/measure_weights.py rss /tmp/w/shared --cache /tmp/w/cache   # twice: first and later load
    python tools/measure_weights.py rss /tmp/w/shared                         # the session cache off

``unshare`` rewrites ``unet.onnx`` and ``unet_cfg.onnx`` exactly as the exporter did before
(``onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True,
location=<graph>.onnx.data, size_threshold=1024)``) and hard-links the other files.
``rss`` loads ``Sampler.load(bundle, backend="onnxruntime")``, generates one 512 px image
with two steps (one CFG call, one late call: every weight touched), and prints VmRSS, RssAnon,
RssFile and Pss from ``/proc/self`` after the load and after the run, as JSON.
``--sessions plain`` opens each graph by path with no sharing (the backend before this
change); ``shared`` is :func:`cfgswitch.runners.ort_sessions.open_sessions`, with its optimized-graph
cache in ``--cache DIR`` (off without it). ``--level`` and ``--no-prepack`` are the experiments
of docs/export.md ("Weights once").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def memory() -> Dict[str, float]:
    """MB figures of this process: VmRSS, VmHWM, RssAnon, RssFile (``/proc/self/status``) and Pss (smaps_rollup)."""
    out: Dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {k: round(v, 1) for k, v in out.items()}


def sd15_model(seed: int = 0):
    """A pipeline-like object: the SD 1.5-size random UNet, a tiny CLIP text encoder of width 768, a tiny VAE (factor 8)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cfgswitch.benchmarks.gpu_models import SD15_UNET
    from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG
    from cfgswitch.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(SD15_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), in_channels=3, out_channels=3, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=32, sample_size=512)
    torch.manual_seed(seed + 2)
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=768,
                                      intermediate_size=64, num_attention_heads=12, num_hidden_layers=1,
                                      vocab_size=49408, max_position_embeddings=77))
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer(),
                           scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), name_or_path="sd15-random-unet")


def bundle_bytes(path: Path) -> Dict[str, int]:
    """Bytes per file of a bundle (hard links counted once per bundle) and in all."""
    sizes = {f.relative_to(path).as_posix(): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    return {"total": sum(sizes.values()), **{k: v for k, v in sizes.items() if v > 1_000_000}}


def cmd_export(out: Path) -> None:
    from cfgswitch.export.exporter import check_options, export_bundle

    t = time.time()
    export_bundle(sd15_model(), out, check_options(height=512, width=512, batch_sizes=[1], overwrite=True), progress=False)
    print(json.dumps({"export_s": round(time.time() - t, 1), "bytes": bundle_bytes(out), "peak": memory()}, indent=1))


def cmd_unshare(src: Path, dst: Path) -> None:
    import onnx

    from cfgswitch.bundle import sha256_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text())
    unet_files = {manifest["graphs"][g]["file"] for g in ("unet", "unet_cfg")}
    shared = {manifest["graphs"][g]["external_data"]["file"] for g in ("unet", "unet_cfg")}
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_dir() or rel in unet_files or rel in shared or rel == "manifest.json":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dst / rel)
    for g in ("unet", "unet_cfg"):
        entry = manifest["graphs"][g]
        model = onnx.load(str(src / entry["file"]), load_external_data=True)
        target = dst / entry["file"]
        data = target.with_name(target.name + ".data")
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        del model
        onnx.checker.check_model(str(target))
        entry.update(sha256=sha256_file(target), bytes=target.stat().st_size,
                     external_data={"file": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size})
    for role in manifest["roles"].values():
        role["sha256"] = manifest["graphs"][role["graph"]]["sha256"]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"bytes": bundle_bytes(dst)}, indent=1))


def cmd_rss(bundle: Path, sessions: str, threads: int, steps: int, level: str, cache: "Path | None",
            no_prepack: bool) -> None:
    import onnxruntime as ort

    import cfgswitch.runners.onnxruntime as backend
    from cfgswitch import Sampler
    from cfgswitch.runners import ort_sessions

    if sessions == "plain":
        backend.open_sessions = ort_sessions.open_plain_sessions
    if cache is None:
        os.environ[ort_sessions.CACHE_ENV] = "0"
    else:
        os.environ["CFGSWITCH_CACHE"] = str(cache)
    inner = backend.open_sessions

    def with_options(ort_mod, b, names, options, providers, provider_options):
        if level != "all":
            options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
        if no_prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return inner(ort_mod, b, names, options, providers, provider_options)

    backend.open_sessions = with_options
    base = memory()
    t = time.time()
    sampler = Sampler.load(bundle, backend="onnxruntime", threads=threads, verify_files=False)
    load_s = time.time() - t
    loaded = memory()
    t = time.time()
    out = sampler.generate(["a red fox"], steps=steps, plan="switch:0.5", seed=0, height=512, width=512,
                           output_type="np")
    run_s = time.time() - t
    ran = memory()
    import numpy as np

    print(json.dumps({"bundle": str(bundle), "sessions": sessions, "level": level, "threads": threads,
                      "cache": str(cache) if cache else None, "no_prepack": no_prepack,
                      "before_load": base, "after_load": loaded, "after_generate": ran, "load_s": round(load_s, 1),
                      "generate_s": round(run_s, 1), "image_sum": float(np.asarray(out.images, dtype=np.float64).sum()),
                      "loadavg": Path("/proc/loadavg").read_text().split()[:3]}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("out", type=Path)
    u = sub.add_parser("unshare")
    u.add_argument("src", type=Path)
    u.add_argument("dst", type=Path)
    r = sub.add_parser("rss")
    r.add_argument("bundle", type=Path)
    r.add_argument("--sessions", choices=("plain", "shared"), default="shared")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--level", choices=("all", "extended", "basic"), default="all")
    r.add_argument("--cache", type=Path, default=None, help="the session cache on, in this folder (default: off)")
    r.add_argument("--no-prepack", action="store_true", help="session.disable_prepacking=1")
    a = p.parse_args(argv)
    if a.cmd == "export":
        cmd_export(a.out)
    elif a.cmd == "unshare":
        cmd_unshare(a.src, a.dst)
    else:
        cmd_rss(a.bundle, a.sessions, a.threads, a.steps, a.level, a.cache, a.no_prepack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
