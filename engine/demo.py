"""``cfgswitch demo``: the embedded model with CFG all the way and with the switch, side by side.

It loads the default model (or a bundle given with ``--bundle``) on the fastest backend
installed for it, generates a few prompts with ``always()`` and with ``switch_at(0.5)``,
saves one PNG grid (``grid.png`` in ``--out``, by default ``./cfgswitch-demo/``) and prints
the time per image, the UNet rows of each plan and the speedup.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict, List, Sequence

from .cli_options import (
    add_model_option,
    add_overwrite_option,
    add_sampling_options,
    add_threads_option,
    apply_threads,
    check_output_folder,
    check_threads,
)
from .errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: The demo's prompts: one object each, every colour of the palette's first four, every shape.
DEMO_PROMPTS = (
    "a large red circle at the top left on a white background",
    "a small blue square at the centre on a black background",
    "a large yellow triangle at the bottom right on a gray background",
    "a large green cross at the top right on a black background",
)
#: The two plans the demo compares.
DEMO_PLANS = ("always", "switch:0.5")
#: Where the demo writes when ``--out`` is not given (the repository's .gitignore lists it).
DEFAULT_OUT = "cfgswitch-demo"
#: The grid's file name inside ``--out``.
GRID_NAME = "grid.png"


def add_parser(sub) -> None:
    """Register ``demo``."""
    p = sub.add_parser("demo", help="generate a few prompts with and without the CFG switch, save a PNG grid")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder; the grid is {GRID_NAME} in it")
    add_overwrite_option(p)
    add_model_option(p)
    p.add_argument("--bundle", default=None, help="an exported bundle to run instead (its fastest backend is used)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="auto (default): ONNX Runtime through a bundle exported once into the user cache when "
                        "onnxruntime is installed, else torch")
    add_sampling_options(p, plan=False, guidance_dest="guidance_scale")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per plan; the fastest counts")
    add_threads_option(p)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: four demo prompts)")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.steps < 2:
        raise InvalidArgumentError("--steps", "an integer >= 2", args.steps)
    if args.repeats < 1:
        raise InvalidArgumentError("--repeats", "a positive integer", args.repeats)
    check_threads(args.threads)
    from . import validation as v
    from .schedulers import scheduler_class_name

    scheduler_class_name(args.scheduler)
    v.check_guidance(args.guidance_scale)
    prompts = v.check_prompts(list(args.prompt)) if args.prompt else list(DEMO_PROMPTS)
    v.check_seeds(args.seed, len(prompts))
    check_output_folder(args.out, args.overwrite)
    if args.bundle is not None and not (Path(args.bundle) / "manifest.json").is_file():
        raise InvalidArgumentError("--bundle", "a bundle folder with manifest.json", args.bundle)


def _cached_bundle(model_dir: Path, batch: int) -> "Path | None":
    """An ONNX bundle of ``model_dir`` in the user cache, exported once; ``None`` without the exporter."""
    import hashlib
    import importlib.util
    import os

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from .export_bridge import export_bundle_if_available

    digest = hashlib.sha256()
    for f in sorted(model_dir.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            digest.update(f.relative_to(model_dir).as_posix().encode())
            digest.update(f.read_bytes())
    cache = Path(os.environ.get("CFGSWITCH_CACHE", Path.home() / ".cache" / "cfgswitch"))
    bundle = cache / "bundles" / f"{model_dir.name}-{digest.hexdigest()[:16]}-b{batch}"
    if (bundle / "manifest.json").is_file():
        from .bundle import read_manifest
        from .errors import BundleError

        try:
            read_manifest(bundle)
            return bundle
        except BundleError as e:  # written by an older cfgswitch (no sealed files, say): export it again
            logger.info("the cached bundle %s is refused (%s); exporting it again", bundle, e)
            export = export_bundle_if_available(model_dir, bundle, batch_sizes=sorted({1, batch}), overwrite=True)
            return export
    logger.info("exporting %s to an ONNX bundle for the fastest installed backend (once): %s", model_dir, bundle)
    return export_bundle_if_available(model_dir, bundle, batch_sizes=sorted({1, batch}))


def load_demo_sampler(model: str = "default", bundle: "str | None" = None, backend: str = "auto", batch: int = 4,
                      threads: "int | None" = None):
    """The sampler the demo runs: the fastest installed backend for the model.

    A bundle runs on its best backend. A diffusers folder runs on ONNX Runtime through a bundle
    exported once into the user cache when ONNX Runtime and the exporter are installed
    (``backend="auto"`` or ``"onnxruntime"``), else on torch. ``threads`` sets ONNX Runtime's
    intra-op threads (torch's are set by the caller).
    """
    ort_options = {"threads": threads} if threads is not None else {}
    from .default_model import resolve_model
    from .sampler import Sampler

    if bundle is not None:
        return Sampler.load(bundle, backend=None if backend == "auto" else backend)
    model_dir = resolve_model(model)
    if backend in ("auto", "onnxruntime"):
        exported = _cached_bundle(Path(model_dir), batch)
        if exported is not None:
            return Sampler.load(exported, backend="onnxruntime", **ort_options)
        if backend == "onnxruntime":
            from .errors import BackendUnavailableError

            raise BackendUnavailableError("--backend onnxruntime needs onnxruntime and onnx: pip install 'cfgswitch[cpu]'")
    return Sampler.load(model_dir, backend="torch")


def compare_plans(sampler, prompts: Sequence[str], steps: int = 30, guidance_scale: float = 7.5, seed: int = 0,
                  repeats: int = 3, plans: Sequence[str] = DEMO_PLANS, scheduler: str = "ddim") -> Dict[str, Dict]:
    """Per plan: images, best seconds per image over ``repeats`` runs, UNet rows of the batch."""
    sampler.generate(list(prompts), steps=2, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler)  # warm-up
    best: Dict[str, object] = {}
    for _ in range(repeats):  # plans interleaved, so a busy machine slows both alike
        for plan in plans:
            out = sampler.generate(list(prompts), steps=steps, guidance_scale=guidance_scale, plan=plan, seed=seed,
                                   scheduler=scheduler)
            if plan not in best or out.timings["total"] < best[plan].timings["total"]:
                best[plan] = out
    return {
        plan: {
            "images": out.images, "seconds_per_image": out.timings["total"] / len(prompts),
            "unet_rows": out.unet_rows, "cfg_steps": out.cfg_steps, "late_steps": out.late_steps,
        }
        for plan, out in best.items()
    }


def save_grid(results: Dict[str, Dict], prompts: Sequence[str], path: Path, cell: int = 192) -> Path:
    """One PNG: a row per prompt, a column per plan, each labelled."""
    from PIL import Image, ImageDraw

    plans = list(results)
    head, label_w = 22, 300
    grid = Image.new("RGB", (label_w + cell * len(plans), head + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, plan in enumerate(plans):
        draw.text((label_w + j * cell + 6, 5), plan, fill="black")
    for i, prompt in enumerate(prompts):
        words, lines, line = prompt.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 44:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines):
            draw.text((6, head + i * cell + 8 + 14 * k), text, fill="black")
        for j, plan in enumerate(plans):
            img = results[plan]["images"][i].resize((cell, cell), Image.NEAREST)
            grid.paste(img, (label_w + j * cell, head + i * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def format_table(results: Dict[str, Dict]) -> List[str]:
    """The printed table: plan, seconds per image, UNet rows, speedup over the first plan."""
    plans = list(results)
    base = results[plans[0]]["seconds_per_image"]
    lines = [f"{'plan':<14} {'s/image':>9} {'UNet rows':>10} {'CFG/late steps':>15} {'speedup':>8}"]
    for plan in plans:
        r = results[plan]
        steps = f"{r['cfg_steps']}/{r['late_steps']}"
        lines.append(f"{plan:<14} {r['seconds_per_image']:>9.4f} {r['unet_rows']:>10d} {steps:>15} {base / r['seconds_per_image']:>7.2f}x")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0."""
    _check(args)
    prompts = list(args.prompt) if args.prompt else list(DEMO_PROMPTS)
    apply_threads(args.threads)
    from .cli import route_library_logs

    route_library_logs()
    sampler = load_demo_sampler(args.model, args.bundle, args.backend, len(prompts), args.threads)
    where = "an exported bundle" if sampler.backend != "torch" else "a diffusers folder; pip install 'cfgswitch[cpu]' for onnxruntime"
    print(f"backend: {sampler.backend} ({where}); model: {sampler.source}")
    results = compare_plans(sampler, prompts, args.steps, args.guidance_scale, args.seed, args.repeats,
                            scheduler=args.scheduler)
    path = save_grid(results, prompts, Path(args.out) / GRID_NAME)
    print(f"{len(prompts)} prompts, {args.steps} steps, guidance {args.guidance_scale}, batch of {len(prompts)}:")
    for line in format_table(results):
        print(line)
    print(f"grid: {path}")
    return 0
