"""The :class:`Sampler`: one user-facing entry over tokenizer, runners, scheduler and plan.

``generate`` only orchestrates, in numbered stages; the denoising loop lives in
:mod:`cfgswitch.loop` and never branches on the backend.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import validation as v
from .backends.registry import backend_names
from .conditioning import TEXT, Conditioning
from .errors import BackendUnavailableError, InvalidArgumentError, ModelLoadError
from .loop import LoopRequest, denoise
from .output import GenerationOutput, to_uint8
from .plans import GuidancePlan
from .model_spec import ModelSpec, module_dims
from .request import check_request
from .runners.base import Runners
from .timing import StageTimer
from .tokenizer import tokenize, truncation_warnings

if TYPE_CHECKING:  # pragma: no cover
    from .families import Family
    from .families.base import SizeConditioning
    from .step_engine import StepEngine

logger = logging.getLogger(__name__)

#: Backend names, read from the registry (:mod:`cfgswitch.backends.registry`), where each is defined.
BACKENDS = backend_names()


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
        extras (`dict`, optional): what the family's text recipe needs beside the runners and
            ``tokenizer`` (an SDXL bundle: ``tokenizer_2``, ``force_zeros_for_empty_prompt``).
    """

    def __init__(self, runners: Runners, tokenizer, scheduler_config: Dict[str, Any], spec: ModelSpec, source: str = "",
                 extras: Optional[Dict[str, Any]] = None) -> None:
        self.runners = runners
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.spec = spec
        self.source = source
        self.extras: Dict[str, Any] = dict(extras or {})
        # Kept by from_diffusers so that baselines and analyses can reuse the exact modules.
        self.modules: Dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_diffusers(cls, model: Any, device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype] = torch.float32,
                       mode: str = "eager", compile_options: Optional[Dict[str, Any]] = None) -> "Sampler":
        """A PyTorch-backend sampler from a diffusers folder or a ``StableDiffusionPipeline``.

        Args:
            model (`str`, `Path` or pipeline): a diffusers Stable Diffusion folder (safetensors
                weights; ``"default"`` is the embedded model) or a pipeline object with ``unet``, ``vae``, ``text_encoder``,
                ``tokenizer`` and ``scheduler``.
            device (`str` or `torch.device`, defaults to ``"cpu"``): where to run.
            dtype (`str` or `torch.dtype`, defaults to float32): weights and latents dtype.
            mode (`str`, defaults to ``"eager"``): how the UNet runs: ``eager``, ``compile``
                (``torch.compile``, compiled at the first call of each shape) or ``graphs`` (one CUDA
                graph per shape, captured once; CUDA only).
            compile_options (`dict`, optional): ``torch.compile`` options in ``compile`` mode.
        """
        from .families import detect_folder, detect_pipeline, get_family
        from .runners.torch_modes import check_mode
        from .runners.torch_runners import torch_runners

        dev = torch.device(device)
        dt = _as_torch_dtype(dtype)
        check_mode(mode, dev)  # before any weights are read
        if isinstance(model, (str, Path)):
            from .default_model import resolve_model

            p = resolve_model(str(model)) if str(model) == "default" else Path(model)
            # the family from model_index.json; without one, SD 1.x's checks name what is missing
            family = detect_folder(p) if (p / "model_index.json").is_file() else get_family("sd1")
            comps = family.load_folder(p, dev, dt)
            source = str(p) if str(model) == "default" else str(model)
        else:
            family = detect_pipeline(model)
            comps = family.from_pipeline(model, dev, dt)
            source = type(model).__name__
        unet, vae, text_encoder, tokenizer = comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"]
        spec = family.model_spec(comps, source)
        sampler = cls(torch_runners(text_encoder, unet, vae, dev, dt, mode, compile_options), tokenizer, comps["scheduler_config"], spec, source)
        sampler.modules = {k: v for k, v in comps.items() if k != "scheduler_config"}
        return sampler

    @classmethod
    def load(cls, path: Union[str, Path], backend: Optional[str] = None, **options: Any) -> "Sampler":
        """Load a diffusers folder or an exported bundle on a backend.

        Args:
            path (`str` or `Path`): a diffusers folder (torch backend), a bundle (``manifest.json``),
                or ``"default"`` for the embedded model.
            backend (`str`, optional): a name of :data:`cfgswitch.backends.BACKENDS` (``torch``,
                ``onnxruntime``, ``tensorrt``, ...); ``None`` picks the best one installed for what
                ``path`` is, and logs which.
            options: the backend's options (``BACKENDS[backend].options``: ``device``, ``dtype``,
                ``mode`` for torch; ``providers``, ``threads`` for onnxruntime; ``cuda_graphs``,
                ``layout`` for tensorrt). Others are refused with an error listing the valid ones.

        Raises:
            InvalidArgumentError: an unknown backend, a backend that does not load what ``path``
                is, or an option the backend does not take.
            BundleError: a bundle backend asked for a folder that is not a bundle (names
                ``cfgswitch export``).
        """
        from .backends.registry import check_options, get_backend

        if isinstance(path, str) and path == "default":
            from .default_model import resolve_model

            path = resolve_model(path)
        p = Path(path)
        entry = get_backend(backend) if backend is not None else None
        if entry is not None and entry.source == "bundle" and (p / "model_index.json").is_file():
            raise InvalidArgumentError(
                "backend", f"'torch' for a diffusers folder (export it first: cfgswitch export {p} --out BUNDLE)", backend
            )
        if (p / "manifest.json").is_file() or (entry is not None and entry.source == "bundle"):
            from .bundle_loading import load_bundle_sampler

            return load_bundle_sampler(cls, p, backend, **options)  # not a bundle: "make one with cfgswitch export"
        if entry is not None and entry.source != "diffusers":  # pragma: no cover - registry sources are bundle | diffusers
            raise InvalidArgumentError("backend", "a backend that loads a diffusers folder", backend)
        backend = backend or "torch"
        if entry is None:
            logger.info("backend: torch (a diffusers folder)")
        check_options(backend, options)
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
        max_image_side: Optional[int] = None,
        original_size: Optional[Sequence[int]] = None,
        target_size: Optional[Sequence[int]] = None,
        crops_coords_top_left: Optional[Sequence[int]] = None,
        negative_original_size: Optional[Sequence[int]] = None,
        negative_target_size: Optional[Sequence[int]] = None,
        negative_crops_coords_top_left: Optional[Sequence[int]] = None,
        guidance_rescale: float = 0.0,
    ) -> GenerationOutput:
        """Generate images; see docs/architecture.md for the data flow.

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
            max_image_side (`int`, optional): largest ``height`` and ``width`` accepted; ``None``
                is :func:`cfgswitch.validation.max_side_for` (2x the model's native size). Pass a
                larger value to generate larger images on purpose.
            original_size, target_size, crops_coords_top_left (`tuple[int, int]`, optional): SDXL's
                size conditioning, as diffusers' ``StableDiffusionXLPipeline`` takes it (sizes
                default to ``(height, width)``, the crop to ``(0, 0)``); refused for other families.
            negative_original_size, negative_target_size, negative_crops_coords_top_left: the same
                for the unconditional rows, used when both negative sizes are given (as diffusers).
            guidance_rescale (`float`, defaults to 0): diffusers' CFG rescale ``phi`` in [0, 1]
                (Lin et al. 2023, sec. 3.4; for zero-SNR models) on guided steps.
        """
        timer = StageTimer(self.runners.device)
        t_start = time.perf_counter()
        # 1. Check every argument before any work.
        args = check_request(
            self, prompts, negative_prompts, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
            plan=plan, seed=seed, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
            output_type=output_type, step_kernel=step_kernel, max_image_side=max_image_side,
            size_conditioning=dict(original_size=original_size, target_size=target_size,
                                   crops_coords_top_left=crops_coords_top_left,
                                   negative_original_size=negative_original_size,
                                   negative_target_size=negative_target_size,
                                   negative_crops_coords_top_left=negative_crops_coords_top_left),
            guidance_rescale=guidance_rescale,
        )
        guidance_plan, seeds, factor = args.plan, args.seeds, self.spec.vae_scale_factor

        # 2. Encode the prompts and the negative prompts, once per call.
        with timer("text"):
            conditioning, warnings = self.encode_conditioning(args.prompts, args.negatives, args.images_per_prompt,
                                                              negative_none=args.negative_none, sizes=args.sizes)

        # 3-4. Initial noise from one generator per image, then the switching loop.
        request = LoopRequest(
            conditioning=conditioning, steps=args.steps, guidance_scale=args.guidance_scale,
            scheduler=args.scheduler, plan=guidance_plan, seeds=seeds,
            latent_shape=(self.spec.latent_channels, args.height // factor, args.width // factor),
            progress=progress, step_kernel=args.step_kernel, guidance_rescale=args.guidance_rescale,
        )
        loop = denoise(self.runners, self.scheduler_config, request, timer)

        # 5. Decode.
        images = None
        if args.output_type != "latent":
            with timer("vae"):
                images = self.decode_latents(loop.latents)
            if args.output_type == "pil":
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

    def encode_conditioning(self, prompts: List[str], negatives: List[str], n_per: int, *, negative_none: bool = False,
                            sizes: Optional["SizeConditioning"] = None) -> "tuple[Conditioning, List[str]]":
        """The :class:`~cfgswitch.conditioning.Conditioning` of a request and its truncation warnings.

        The model family's recipe (:mod:`cfgswitch.families`): for SD 1.x/2.x two text-encoder
        calls, as diffusers makes them, so embeddings match it bit for bit; each prompt's
        embeddings repeated ``n_per`` times consecutively, as diffusers does. ``negative_none``
        says no negative prompt was given (SDXL then uses zeros); ``sizes`` is SDXL's size
        conditioning.
        """
        conditioning, warnings = self.family.encode(self, prompts, negatives, n_per, negative_none=negative_none,
                                                    sizes=sizes)
        for w in warnings:
            logger.warning(w)
        return conditioning, warnings

    @property
    def family(self) -> "Family":
        """The model's :class:`~cfgswitch.families.Family`."""
        from .families import get_family

        return get_family(self.spec.family)

    def _encode(self, prompts: List[str], negatives: List[str], n_per: int):
        """``(cond, uncond, warnings)``: the text embeddings of :meth:`encode_conditioning`."""
        conditioning, warnings = self.encode_conditioning(prompts, negatives, n_per)
        return conditioning.cond[TEXT], conditioning.uncond[TEXT], warnings

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents ``[B, C, h, w]`` to float32 images ``[B, H, W, 3]`` in [0, 1]."""
        decoded = self.runners.vae_decoder.decode(latents / self.spec.vae_scaling_factor)
        return (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def engine(self, max_rows: int = 16, **options: Any) -> "StepEngine":
        """A :class:`~cfgswitch.step_engine.StepEngine` over this sampler's runners.

        It holds many requests in flight and advances each one step per iteration, sharing
        every UNet call among them; see :mod:`cfgswitch.step_engine`.

        Args:
            max_rows (`int`, defaults to 16): UNet rows per iteration at most.
            options: the other arguments of :class:`~cfgswitch.step_engine.StepEngine`.
        """
        from .step_engine import StepEngine

        return StepEngine(self, max_rows=max_rows, **options)


def spec_from_modules(unet, vae, text_encoder, tokenizer, name: str, family: str = "sd1",
                      added: Optional[Dict[str, int]] = None) -> ModelSpec:
    """The :class:`ModelSpec` of SD-layout diffusers/transformers modules (``text_width`` is the UNet's
    cross-attention width). A family's full spec (encoders, VAE upcast) is
    :meth:`cfgswitch.families.base.Family.model_spec`."""
    return ModelSpec(
        **module_dims(unet, vae, text_encoder, tokenizer),
        text_width=int(unet.config.cross_attention_dim),
        name=name,
        family=family,
        added=dict(added or {}),
    )


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(img) for img in to_uint8(images)]
