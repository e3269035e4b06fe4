"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two text encoders and added conditioning.

Text encoding as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does it:

- each tokenizer pads its own way (the second pads with ``!``), 77 tokens;
- each encoder's penultimate hidden state, concatenated on the channel axis (768 + 1280);
- the second encoder's projected pooled embedding is ``text_embeds`` (1280);
- with ``force_zeros_for_empty_prompt`` and no negative prompt, the unconditional embeddings
  are zeros; otherwise the negative prompts (``""`` when none) are encoded the same way;
- ``time_ids`` are the six numbers original size, crop top-left and target size (the
  negative side may have its own), one row per image.

The VAE is kept in float32 when the model is loaded in float16 and its config asks for
``force_upcast`` (SDXL's VAE overflows in float16), as diffusers upcasts it to decode; an
fp16 bundle then has a float32 ``vae_decoder`` graph.

The same recipe runs on the torch modules (``Sampler.from_diffusers``) and on a bundle's
runners (``text_encoder`` gives the first encoder's penultimate hidden state,
``text_encoder_2`` its penultimate hidden state and pooled ``text_embeds``), with the
tokenizers the bundle saved.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..conditioning import TEXT, Conditioning
from ..errors import ModelLoadError
from ..model_spec import TextEncoderSpec
from .base import Family, SizeConditioning, prepare_modules

logger = logging.getLogger(__name__)

_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXL(Family):
    """The SDXL family (see the module docstring)."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    size_conditioning = True
    hidden_output = "hidden_states"

    def matches_object(self, pipe: Any) -> bool:
        return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None

    # ------------------------------------------------------------------ loading
    def load_folder(self, path: Any, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from ..model_loading import check_model_dir, read_scheduler_config
        from ..tokenizer import load_clip_tokenizer

        p = check_model_dir(path)
        if not list((p / "text_encoder_2").glob("*.safetensors")):
            raise ModelLoadError(f"model: {str(path)!r} is an SDXL folder without safetensors weights in text_encoder_2/")
        index = json.loads((p / "model_index.json").read_text())
        try:
            unet = UNet2DConditionModel.from_pretrained(p / "unet", torch_dtype=dtype, use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(p / "vae", torch_dtype=dtype, use_safetensors=True)
            te1 = CLIPTextModel.from_pretrained(p / "text_encoder", dtype=dtype, use_safetensors=True)
            te2 = CLIPTextModelWithProjection.from_pretrained(p / "text_encoder_2", dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"model: could not load the weights of {str(path)!r}: {e}") from e
        toks = []
        for name, pad in (("tokenizer", None), ("tokenizer_2", "!")):
            d = p / name
            if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
                toks.append(CLIPTokenizer.from_pretrained(d))
            else:
                logger.info("model %s has no %s/: using CLIP's tokenizer built offline", p, name)
                tok = copy.deepcopy(load_clip_tokenizer())  # the cached one is shared: change a copy
                if pad is not None:
                    tok.pad_token = pad
                toks.append(tok)
        comps = {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "tokenizer": toks[0],
                 "tokenizer_2": toks[1], "scheduler_config": read_scheduler_config(p),
                 "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
        self._prepare(comps, device, dtype)
        return comps

    def from_pipeline(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        missing = [a for a in _PARTS if getattr(pipe, a, None) is None]
        if missing:
            raise ModelLoadError(f"model: expected an SDXL pipeline, got {type(pipe).__name__} without {', '.join(missing)}")
        comps = {a: getattr(pipe, a) for a in _PARTS if a != "scheduler"}
        comps["scheduler_config"] = dict(pipe.scheduler.config)
        comps["force_zeros_for_empty_prompt"] = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        self._prepare(comps, device, dtype)
        return comps

    @staticmethod
    def _prepare(comps: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        prepare_modules((comps["unet"], comps["text_encoder"], comps["text_encoder_2"]), device, dtype)
        vae = comps["vae"]
        vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
        prepare_modules((vae,), device, vae_dtype)

    def added_widths(self, components: Dict[str, Any]) -> Dict[str, int]:
        return {"text_embeds": int(components["text_encoder_2"].config.projection_dim), "time_ids": 6}

    def text_encoders(self, components: Dict[str, Any]) -> Tuple[TextEncoderSpec, ...]:
        te1, te2 = components["text_encoder"].config, components["text_encoder_2"].config
        return (TextEncoderSpec("text_encoder", int(te1.hidden_size), penultimate=True),
                TextEncoderSpec("text_encoder_2", int(te2.hidden_size), int(te2.projection_dim), penultimate=True))

    def vae_force_upcast(self, components: Dict[str, Any]) -> bool:
        return bool(getattr(components["vae"].config, "force_upcast", False))

    @staticmethod
    def _encoders(sampler: Any):
        """``(tokenizer, call)`` per encoder, ``call(ids) -> (penultimate hidden state, pooled or None)``:
        the torch modules when the sampler has them, else the bundle's runners."""
        m = sampler.modules
        device = sampler.runners.device
        if "text_encoder_2" in m:
            def module_call(enc):
                def call(ids: torch.Tensor):
                    with torch.no_grad():
                        out = enc(ids.to(device), output_hidden_states=True)
                    return out.hidden_states[-2], (out[0] if out[0].ndim == 2 else None)
                return call

            return ((m["tokenizer"], module_call(m["text_encoder"])), (m["tokenizer_2"], module_call(m["text_encoder_2"])))
        runners, extras = sampler.runners, getattr(sampler, "extras", {})
        if runners.text_encoder_2 is None or "tokenizer_2" not in extras:
            raise ModelLoadError("sdxl: this sampler has no second text encoder and tokenizer (re-export the bundle)")
        return ((sampler.tokenizer, lambda ids: (runners.text_encoder.encode(ids), None)),
                (extras["tokenizer_2"], runners.text_encoder_2.encode_pooled))

    # ------------------------------------------------------------------ text
    def encode(self, sampler: Any, prompts: Sequence[str], negatives: Sequence[str], n_per: int, *,
               negative_none: bool = False, sizes: Optional[SizeConditioning] = None) -> Tuple[Conditioning, List[str]]:
        from ..tokenizer import tokenize, truncation_warnings

        m = sampler.modules
        parts = {**getattr(sampler, "extras", {}), **m}
        device = sampler.runners.device
        length = sampler.spec.text_length
        pairs = self._encoders(sampler)
        warnings: List[str] = []

        def embed(texts: Sequence[str], label: str) -> Tuple[torch.Tensor, torch.Tensor]:
            hidden, pooled = [], None
            for k, (tok, call) in enumerate(pairs):
                ids = tokenize(tok, texts, length)
                if k == 0:
                    warnings.extend(truncation_warnings(texts, ids, label))
                h, p = call(ids.input_ids)
                if pooled is None and p is not None:
                    pooled = p
                hidden.append(h)
            return torch.cat(hidden, dim=-1), pooled

        cond, cond_pooled = embed(prompts, "prompt")
        if negative_none and parts.get("force_zeros_for_empty_prompt", True):
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(cond_pooled)
        else:
            uncond, uncond_pooled = embed(negatives, "negative prompt")
        dtype = m["text_encoder_2"].dtype if "text_encoder_2" in m else sampler.runners.dtype
        if sizes is None:
            raise ModelLoadError("sdxl: a request needs its size conditioning (original and target size)")
        batch = len(prompts)
        ids_c = torch.tensor([sizes.time_ids(False)], dtype=dtype, device=device).repeat(batch, 1)
        ids_u = torch.tensor([sizes.time_ids(True)], dtype=dtype, device=device).repeat(batch, 1)
        c = {TEXT: cond.to(dtype), "text_embeds": cond_pooled.to(dtype), "time_ids": ids_c}
        u = {TEXT: uncond.to(dtype), "text_embeds": uncond_pooled.to(dtype), "time_ids": ids_u}
        return Conditioning(u, c).repeat_interleave(n_per), warnings


FAMILY = SDXL()

__all__ = ["FAMILY", "SDXL"]
