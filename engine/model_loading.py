"""Loading a diffusers Stable Diffusion folder: checks first, safetensors only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

#: Component folders a Stable Diffusion folder must have (the tokenizer may be absent: CLIP's is built offline).
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "scheduler")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_dir(path: "str | Path") -> Path:
    """Check that ``path`` is a diffusers Stable Diffusion folder whose weights are safetensors.

    Raises:
        ModelLoadError: the folder is missing, a part is missing (named), or a part has only
            pickle checkpoints.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model: expected an existing diffusers folder, got {str(path)!r} (no such path)")
    if not p.is_dir():
        raise ModelLoadError(f"model: expected a diffusers folder, got {str(path)!r} (a file)")
    missing = [part for part in ("model_index.json",) if not (p / part).is_file()]
    missing += [part + "/" for part in REQUIRED_PARTS if not (p / part).is_dir()]
    if missing:
        raise ModelLoadError(
            f"model: {str(path)!r} is not a Stable Diffusion folder: missing {', '.join(missing)}"
        )
    for part in ("unet", "vae", "text_encoder"):
        d = p / part
        if not (d / "config.json").is_file():
            raise ModelLoadError(f"model: {str(path)!r} is not a Stable Diffusion folder: missing {part}/config.json")
        if not list(d.glob("*.safetensors")):
            pickles = [f.name for f in d.iterdir() if f.suffix in _PICKLE_SUFFIXES]
            if pickles:
                raise ModelLoadError(
                    f"model: {part}/ of {str(path)!r} holds only pickle checkpoints ({', '.join(sorted(pickles))}); "
                    "cfgswitch loads safetensors only (convert with diffusers' save_pretrained(safe_serialization=True))"
                )
            raise ModelLoadError(f"model: {str(path)!r} is not a Stable Diffusion folder: no weights in {part}/")
    if not (p / "scheduler" / "scheduler_config.json").is_file():
        raise ModelLoadError(f"model: {str(path)!r} is not a Stable Diffusion folder: missing scheduler/scheduler_config.json")
    return p


def read_scheduler_config(path: Path) -> Dict[str, Any]:
    """The model's scheduler config as a plain dict."""
    return json.loads((path / "scheduler" / "scheduler_config.json").read_text())


def load_components(path: "str | Path", device: torch.device, dtype: torch.dtype) -> Tuple[Any, Any, Any, Any, Dict[str, Any]]:
    """Load ``(tokenizer, text_encoder, unet, vae, scheduler_config)`` from a checked folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tokenizer import load_clip_tokenizer

    p = check_model_dir(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(p / "unet", torch_dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(p / "vae", torch_dtype=dtype, use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(p / "text_encoder", dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"model: could not load the weights of {str(path)!r}: {e}") from e
    tok_dir = p / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(p / "tokenizer")
    else:
        logger.info("model %s has no tokenizer/: using CLIP's tokenizer built offline", p)
        tokenizer = load_clip_tokenizer()
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return tokenizer, text_encoder, unet, vae, read_scheduler_config(p)
