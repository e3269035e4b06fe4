"""The :class:`Sampler`: one user-facing entry over tokenizer, runners, scheduler and plan.

``generate`` only orchestrates, in numbered stages; the denoising loop lives in
:mod:`cfgswitch.loop` and never branches on the backend.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import validation as v
from .errors import BackendUnavailableError, InvalidArgumentError, ModelLoadError
from .loop import LoopRequest, denoise
from .output import GenerationOutput, to_uint8
from .plans import GuidancePlan
from .runners.base import ModelSpec, Runners
from .schedulers import scheduler_class_name
from .timing import StageTimer
from .tokenizer import tokenize, truncation_warnings

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def _as_torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in table:
        return table[dtype.lower()]
    raise InvalidArgumentError("dtype", "one of fp32, fp16, bf16 (or a torch dtype)", dtype)


class Sampler:
    """Text-to-image sampling with classifier-free guidance switched by a :class:`GuidancePlan`.

    Build one with :meth:`from_diffusers` (PyTorch backend) or :meth:`load` (a
    diffusers folder or an exported bundle, any backend), then call :meth:`generate`.

    Args:
        runners (`Runners`): the backend's components.
        tokenizer: a CLIP tokenizer.
        scheduler_config (`dict`): the model's scheduler config.
        spec (`ModelSpec`): latent and text shapes of the model.
        source (`str`, defaults to ``""``): where the model came from, for reports.
    """

    def __init__(self, runners: Runners, tokenizer, scheduler_config: Dict[str, Any], spec: ModelSpec, source: str = "") -> None:
        self.runners = runners
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.spec = spec
        self.source = source
        # Kept by from_diffusers so that baselines and analyses can reuse the exact modules.
        self.modules: Dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_diffusers(cls, model: Any, device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype] = torch.float32) -> "Sampler":
        """A PyTorch-backend sampler from a diffusers folder or a ``StableDiffusionPipeline``.

        Args:
            model (`str`, `Path` or pipeline): a diffusers Stable Diffusion folder (safetensors
                weights) or a pipeline object with ``unet``, ``vae``, ``text_encoder``,
                ``tokenizer`` and ``scheduler``.
            device (`str` or `torch.device`, defaults to ``"cpu"``): where to run.
            dtype (`str` or `torch.dtype`, defaults to float32): weights and latents dtype.
        """
        from .model_loading import load_components
        from .runners.torch_runners import torch_runners

        dev = torch.device(device)
        dt = _as_torch_dtype(dtype)
        if isinstance(model, (str, Path)):
            tokenizer, text_encoder, unet, vae, sched_cfg = load_components(model, dev, dt)
            source = str(model)
        else:
            missing = [a for a in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(model, a, None) is None]
            if missing:
                raise ModelLoadError(f"model: expected a Stable Diffusion pipeline, got {type(model).__name__} without {', '.join(missing)}")
            tokenizer, text_encoder, unet, vae = model.tokenizer, model.text_encoder, model.unet, model.vae
            for m in (unet, vae, text_encoder):
                if m.dtype != dt or m.device != dev:
                    m.to(device=dev, dtype=dt)
                m.eval().requires_grad_(False)
            sched_cfg = dict(model.scheduler.config)
            source = type(model).__name__
        spec = spec_from_modules(unet, vae, text_encoder, tokenizer, source)
        sampler = cls(torch_runners(text_encoder, unet, vae, dev, dt), tokenizer, sched_cfg, spec, source)
        sampler.modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        return sampler

    @classmethod
    def load(cls, path: Union[str, Path], backend: Optional[str] = None, **options: Any) -> "Sampler":
        """Load a diffusers folder or an exported bundle on a backend.

        Args:
            path (`str` or `Path`): a diffusers folder (torch backend) or a bundle (``manifest.json``).
            backend (`str`, optional): ``torch``, ``onnxruntime`` or ``tensorrt``; ``None`` picks the
                best one installed for what ``path`` is, and logs which.
            options: backend options (``device``, ``dtype`` for torch; ``providers``, ``threads``
                for onnxruntime; ``cuda_graphs`` for tensorrt).
        """
        p = Path(path)
        if backend is not None and backend not in BACKENDS:
            raise InvalidArgumentError("backend", f"one of {', '.join(BACKENDS)}", backend)
        if (p / "manifest.json").is_file():
            try:
                from .bundle_loading import load_bundle_sampler
            except ImportError as e:  # pragma: no cover - the bundle runtime ships with the package
                raise BackendUnavailableError(f"bundles need the bundle runtime: {e}") from e
            return load_bundle_sampler(cls, p, backend, **options)
        if backend not in (None, "torch"):
            if p.is_dir() and (p / "model_index.json").is_file():
                raise InvalidArgumentError(
                    "backend", f"'torch' for a diffusers folder (export it first: cfgswitch export {p} --out BUNDLE)", backend
                )
        if backend is None:
            logger.info("backend: torch (a diffusers folder)")
        return cls.from_diffusers(p, **options)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """The backend's name."""
        return self.runners.backend

    @property
    def device(self) -> torch.device:
        return self.runners.device

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        negative_prompts: Union[None, str, Sequence[str]] = None,
        *,
        steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        plan: Union[str, GuidancePlan] = "always",
        seed: Union[None, int, Sequence[int]] = 0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        progress: bool = False,
        step_kernel: str = "auto",
    ) -> GenerationOutput:
        """Generate images; see DESIGN.md section 4 for the data flow.

        Args:
            prompts (`str` or `list[str]`): one prompt or a non-empty list.
            negative_prompts (`str` or `list[str]`, optional): one per prompt (or one for all);
                ``None`` means the empty prompt.
            steps (`int`, defaults to 30): denoising steps (UNet calls per image).
            guidance_scale (`float`, defaults to 7.5): CFG weight ``w`` in ``u + w (c - u)``. At
                ``w <= 1`` there is no guidance, as in diffusers: every step runs the B rows of
                the prompt alone (the plan becomes ``switch:0:cond``; negative prompts go unused).
            scheduler (`str`, defaults to ``"ddim"``): a name from :data:`cfgswitch.SCHEDULER_NAMES`.
            plan (`str` or `GuidancePlan`, defaults to ``"always"``): which steps run guided.
            seed (`int` or `list[int]`, defaults to 0): an int gives image i the seed ``seed + i``;
                a list gives each image its own; ``None`` draws one.
            height, width (`int`, optional): image size in pixels, multiples of the VAE factor.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            output_type (`str`, defaults to ``"pil"``): ``pil``, ``np`` or ``latent``.
            progress (`bool`, defaults to False): show a progress bar over the steps.
            step_kernel (`str`, defaults to ``"auto"``): ``auto`` uses the fused guide-and-step op
                where it covers the scheduler and device (``GenerationOutput.step_kernel`` says
                which ran), ``reference`` forces diffusers' ``scheduler.step``, ``fused`` requires
                the fused op.
        """
        timer = StageTimer(self.runners.device)
        t_start = time.perf_counter()
        # 1. Check every argument before any work.
        prompt_list = v.check_prompts(prompts)
        negative_list = v.check_negative_prompts(negative_prompts, len(prompt_list))
        steps = v.check_positive_int("steps", steps, 1, 10_000)
        guidance = v.check_guidance(guidance_scale)
        scheduler_class_name(scheduler)
        guidance_plan = GuidancePlan.parse(plan)
        if guidance <= 1.0:  # as diffusers: no classifier-free guidance, the prompt's B rows every step
            unguided = GuidancePlan.switch_at(0.0, late="cond")
            if guidance_plan != unguided:
                logger.info("guidance_scale %s <= 1: no classifier-free guidance (plan %s -> %s)", guidance, guidance_plan, unguided)
            guidance_plan = unguided
        n_per = v.check_positive_int("num_images_per_prompt", num_images_per_prompt, 1, 1024)
        batch = len(prompt_list) * n_per
        seeds = v.check_seeds(seed, batch)
        factor = self.spec.vae_scale_factor
        height = v.check_size("height", self.spec.default_size if height is None else height, factor)
        width = v.check_size("width", self.spec.default_size if width is None else width, factor)
        output_type = v.check_output_type(output_type)
        if step_kernel not in ("auto", "fused", "reference"):
            raise InvalidArgumentError("step_kernel", "'auto', 'fused' or 'reference'", step_kernel)
        if self.runners.check_request is not None:
            self.runners.check_request(batch=batch, height=height, width=width)

        # 2. Encode the prompts and the negative prompts, once per call.
        with timer("text"):
            cond, uncond, warnings = self._encode(prompt_list, negative_list, n_per)

        # 3-4. Initial noise from one generator per image, then the switching loop.
        request = LoopRequest(
            cond=cond, uncond=uncond, steps=steps, guidance_scale=guidance, scheduler=scheduler,
            plan=guidance_plan, seeds=seeds, latent_shape=(self.spec.latent_channels, height // factor, width // factor),
            progress=progress, step_kernel=step_kernel,
        )
        loop = denoise(self.runners, self.scheduler_config, request, timer)

        # 5. Decode.
        images = None
        if output_type != "latent":
            with timer("vae"):
                decoded = self.runners.vae_decoder.decode(loop.latents / self.spec.vae_scaling_factor)
                images = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = _to_pil(images)
        timings = timer.totals()
        timings["total"] = time.perf_counter() - t_start
        return GenerationOutput(
            images=images, latents=loop.latents, timings=timings, cfg_steps=loop.cfg_steps,
            late_steps=loop.late_steps, unet_rows=loop.unet_rows, warnings=warnings, plan=str(guidance_plan),
            late_mode=guidance_plan.late, backend=self.backend, step_kernel=loop.step_kernel,
            switch_step=loop.switch_step, seeds=seeds, info=dict(self.runners.info),
        )

    def encode_prompts(self, prompts: Sequence[str]) -> "tuple[torch.Tensor, List[int]]":
        """Embeddings ``[N, L, C]`` of ``prompts`` and the tokens truncation dropped from each."""
        tok = tokenize(self.tokenizer, prompts, self.spec.text_length)
        return self.runners.text_encoder.encode(tok.input_ids), tok.dropped

    def _encode(self, prompts: List[str], negatives: List[str], n_per: int):
        tok_c = tokenize(self.tokenizer, prompts, self.spec.text_length)
        tok_u = tokenize(self.tokenizer, negatives, self.spec.text_length)
        warnings = truncation_warnings(prompts, tok_c, "prompt") + truncation_warnings(negatives, tok_u, "negative prompt")
        for w in warnings:
            logger.warning(w)
        # Two calls, as diffusers makes them, so embeddings match it bit for bit.
        cond = self.runners.text_encoder.encode(tok_c.input_ids)
        uncond = self.runners.text_encoder.encode(tok_u.input_ids)
        # diffusers repeats each prompt's embeddings n_per times consecutively
        cond = cond.repeat_interleave(n_per, dim=0)
        uncond = uncond.repeat_interleave(n_per, dim=0)
        return cond, uncond, warnings


def spec_from_modules(unet, vae, text_encoder, tokenizer, name: str) -> ModelSpec:
    """The :class:`ModelSpec` of diffusers/transformers modules."""
    return ModelSpec(
        latent_channels=int(unet.config.in_channels),
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        vae_scaling_factor=float(vae.config.scaling_factor),
        sample_size=int(unet.config.sample_size),
        text_length=int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)),
        text_width=int(text_encoder.config.hidden_size),
        name=name,
    )


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(img) for img in to_uint8(images)]
