"""``guide_and_step``: CFG combine, scheduler update and cosine similarity in one pass.

Three implementations share one contract (``kernels/include/cfgswitch_kernels.h``):

- the C++ CPU kernel in ``cfgswitch._kernels`` (float32),
- the CUDA kernel in ``libcfgswitch_cuda.so`` (float16 and float32, one launch on the caller's
  stream), a C library loaded here with :mod:`ctypes`,
- :func:`~cfgswitch.kernels.reference.guide_and_step_reference`, plain torch: the fallback
  and the test oracle.

Every parameter is per image: ``rows`` (int32 ``[B, 4]``: first row, second row or -1, update
form, 0) and ``params`` (float32 ``[B, 8]``: guidance weight, ``c0..c5``, 0). The form also says
how the model output becomes x0 (epsilon or v-prediction, see :class:`StepForm`). The host computes
the coefficients from a diffusers scheduler (see :mod:`cfgswitch.fused`, one rule per scheduler).
"""

from __future__ import annotations

import ctypes
import logging
import os
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .guidance_rescale import Rescale, rescale_factors, rescale_noise_cfg_reference
from .reference import guide_and_step_reference

logger = logging.getLogger(__name__)

#: float32 parameters per image: ``w, c0, c1, c2, c3, c4, c5, unused``.
PARAMS_PER_IMAGE = 8
#: int32 row entries per image: ``row_a, row_b (-1: one prediction), form, unused``.
ROWS_PER_IMAGE = 4
_CUDA_LIBRARY_NAME = "libcfgswitch_cuda.so"
_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1}


class StepForm(IntEnum):
    """How the model output ``e`` becomes x0, and x0 the next latents (one per scheduler family).

    Epsilon forms (0..3) take ``x0 = (x - c0 e) / c1``. The v-prediction forms (4..7, the
    epsilon form plus :data:`V_PREDICTION`) convert per row instead: ``x0 = c1 x - c0 e`` (DDIM,
    multistep), Euler's ``x0 = c0 e + x / c1``; DDIM's update then uses ``e' = c1 e + c0 x``.
    """

    DDIM = 0  #: ``c2 x0 + c3 e``
    EULER = 1  #: ``x + ((x - x0) / c2) c3``
    MULTISTEP_1 = 2  #: ``c2 x - c3 x0`` (DPM-Solver++ first order)
    MULTISTEP_2 = 3  #: ``(c2 x - c3 x0) - c5 (c4 (x0 - prev))`` (DPM-Solver++ 2M)
    DDIM_V = 4  #: ``x0 = c1 x - c0 e``, ``e' = c1 e + c0 x``; ``c2 x0 + c3 e'``
    EULER_V = 5  #: ``x0 = c0 e + x / c1``; ``x + ((x - x0) / c2) c3``
    MULTISTEP_1_V = 6  #: ``x0 = c1 x - c0 e``; ``c2 x - c3 x0``
    MULTISTEP_2_V = 7  #: ``x0 = c1 x - c0 e``; ``(c2 x - c3 x0) - c5 (c4 (x0 - prev))``

    @property
    def needs_prev(self) -> bool:
        """Whether the form reads the previous step's x0 (``prev``)."""
        return self in (StepForm.MULTISTEP_2, StepForm.MULTISTEP_2_V)


#: Added to an epsilon form's code: the same update on a v-prediction model.
V_PREDICTION = 4


class GuideStepResult(NamedTuple):
    """What :func:`guide_and_step` returns."""

    latents: torch.Tensor  #: the next latents, shape and dtype of ``sample``
    x0: Optional[torch.Tensor]  #: the predicted clean latents, when asked
    cosine: Optional[torch.Tensor]  #: float32 ``[B]`` cosines (NaN for one prediction), when asked


# ------------------------------------------------------------------------------ packing helpers
def rows_for_modes(guided: Sequence[bool]) -> Tuple[List[int], List[int], int]:
    """Row indices for a batch that mixes guided and one-prediction images.

    The UNet output is laid out as the first row of every image in image order (the
    unconditional row of a guided image, the only row of the others), then the conditional rows
    of the guided images in image order. All guided gives diffusers' ``[uncond; cond]``.

    Returns:
        ``(rows_a, rows_b, pred_rows)`` with ``rows_b[b] = -1`` for one-prediction images.
    """
    batch = len(guided)
    rows_a = list(range(batch))
    rows_b, nxt = [], batch
    for g in guided:
        rows_b.append(nxt if g else -1)
        nxt += 1 if g else 0
    return rows_a, rows_b, nxt


def pack_rows(rows_a: Sequence[int], rows_b: Sequence[int], forms: Sequence[int]) -> torch.Tensor:
    """The int32 ``[B, 4]`` row block of :func:`guide_and_step`."""
    if not len(rows_a) == len(rows_b) == len(forms):
        raise ValueError(f"rows_a, rows_b, forms: expected equal lengths, got {len(rows_a)}, {len(rows_b)}, {len(forms)}")
    return torch.tensor([[int(a), int(b), int(f), 0] for a, b, f in zip(rows_a, rows_b, forms)], dtype=torch.int32)


def pack_params(weights: Sequence[float], coefficients: Sequence[Sequence[float]]) -> torch.Tensor:
    """The float32 ``[B, 8]`` parameter block: each image's weight and its six coefficients."""
    if len(weights) != len(coefficients) or any(len(c) != 6 for c in coefficients):
        raise ValueError("coefficients: expected one sequence of 6 numbers per weight")
    return torch.tensor([[float(w), *map(float, c), 0.0] for w, c in zip(weights, coefficients)], dtype=torch.float32)


# ------------------------------------------------------------------------------ availability
def _cpu_module():
    from . import compiled_module

    module = compiled_module()
    return module if module is not None and hasattr(module, "guide_and_step_f32") else None


def _cuda_library_path() -> Optional[Path]:
    override = os.environ.get("CFGSWITCH_CUDA_LIBRARY")
    if override:
        return Path(override) if Path(override).is_file() else None
    import cfgswitch

    for folder in getattr(cfgswitch, "__path__", []):
        candidate = Path(folder) / _CUDA_LIBRARY_NAME
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=1)
def cuda_library() -> Optional[ctypes.CDLL]:
    """The CUDA kernels' C library (loaded on first use), or ``None`` when it was not built."""
    path = _cuda_library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # pragma: no cover - depends on the machine
        logger.warning("cannot load %s: %s", path, e)
        return None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.cfgswitch_guide_and_step_cuda.argtypes = [
        vp, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int, vp, vp, ctypes.c_int
    ]
    lib.cfgswitch_guide_and_step_cuda.restype = ctypes.c_int
    lib.cfgswitch_guide_and_step_workspace_bytes.argtypes = [i64]
    lib.cfgswitch_guide_and_step_workspace_bytes.restype = i64
    lib.cfgswitch_cuda_error_string.argtypes = [ctypes.c_int]
    lib.cfgswitch_cuda_error_string.restype = ctypes.c_char_p
    return lib


def has_cuda_kernels() -> bool:
    """Whether the CUDA library was built (found next to the package); loads nothing."""
    return _cuda_library_path() is not None


def compiled_available(device: "torch.device | str", dtype: torch.dtype) -> bool:
    """Whether a compiled ``guide_and_step`` serves tensors of ``dtype`` on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dtype == torch.float32 and _cpu_module() is not None
    if dev.type == "cuda":
        return dtype in _CUDA_DTYPES and has_cuda_kernels() and cuda_library() is not None
    return False


# ------------------------------------------------------------------------------ the op
_WORKSPACES: Dict[Tuple[int, int], torch.Tensor] = {}


def _workspace(lib: ctypes.CDLL, device: torch.device, stream: int, batch: int) -> torch.Tensor:
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream)
    need = int(lib.cfgswitch_guide_and_step_workspace_bytes(batch))
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel() < need:
        ws = torch.zeros(max(need, 4096), dtype=torch.uint8, device=device)  # zeroed once; the kernel re-zeroes
        _WORKSPACES[key] = ws
    return ws


def _check(pred, sample, rows, params, prev, out, check_rows: bool) -> Tuple[int, int]:
    if sample.dim() < 1 or sample.shape[0] < 1:
        raise ValueError(f"sample: expected shape [B, ...] with B >= 1, got {tuple(sample.shape)}")
    batch = sample.shape[0]
    per_image = sample.numel() // batch
    if pred.dim() < 1 or pred.shape[0] < 1 or pred.numel() != pred.shape[0] * per_image:
        raise ValueError(f"pred: expected shape [R, ...] with {per_image} elements per row, got {tuple(pred.shape)}")
    if tuple(rows.shape) != (batch, ROWS_PER_IMAGE) or rows.dtype != torch.int32:
        raise ValueError(f"rows: expected int32 of shape ({batch}, {ROWS_PER_IMAGE}), got {rows.dtype} {tuple(rows.shape)}")
    if tuple(params.shape) != (batch, PARAMS_PER_IMAGE) or params.dtype != torch.float32:
        raise ValueError(
            f"params: expected float32 of shape ({batch}, {PARAMS_PER_IMAGE}), got {params.dtype} {tuple(params.shape)}"
        )
    for name, t in (("pred", pred), ("prev", prev), ("out", out)):
        if t is not None and (t.dtype != sample.dtype or t.device != sample.device):
            raise ValueError(f"{name}: expected {sample.dtype} on {sample.device}, got {t.dtype} on {t.device}")
    for name, t in (("prev", prev), ("out", out)):
        if t is not None and t.shape != sample.shape:
            raise ValueError(f"{name}: expected shape {tuple(sample.shape)}, got {tuple(t.shape)}")
    if check_rows and rows.device.type == "cpu":
        r = rows.tolist()
        for b, (ra, rb, form, _) in enumerate(r):
            if not 0 <= ra < pred.shape[0] or not -1 <= rb < pred.shape[0]:
                raise ValueError(f"rows[{b}]: expected rows in [0, {pred.shape[0]}) (row_b may be -1), got {ra}, {rb}")
            if not 0 <= form < len(StepForm):
                raise ValueError(f"rows[{b}, 2]: expected a form in 0..{len(StepForm) - 1}, got {form}")
            if StepForm(form).needs_prev and prev is None:
                raise ValueError(f"prev: expected the previous x0 for image {b} (form {form}), got None")
    return batch, per_image


def _rescaled_rows(
    pred: torch.Tensor, rows: torch.Tensor, params: torch.Tensor, guidance_rescale: Rescale, want_cosine: bool
) -> Tuple[torch.Tensor, torch.Tensor, Dict[int, torch.Tensor]]:
    """Guided images with ``phi > 0``: combine and rescale in torch, then step them as one prediction.

    Returns the UNet rows with the rescaled predictions appended, the rows block pointing those
    images at them (``row_b = -1``), and their cosines (from the original two rows) when asked.
    """
    rows_h = rows.to("cpu").tolist()
    phi = rescale_factors(guidance_rescale, len(rows_h))
    on = [b for b, r in enumerate(rows_h) if r[1] >= 0 and phi[b] > 0.0]
    if not on:
        return pred, rows, {}
    dev = pred.device
    ia = torch.tensor([rows_h[b][0] for b in on], dtype=torch.long, device=dev)
    ib = torch.tensor([rows_h[b][1] for b in on], dtype=torch.long, device=dev)
    u, c = pred.index_select(0, ia).float(), pred.index_select(0, ib).float()
    w = params.to(dev, torch.float32)[torch.tensor(on, device=dev), 0].reshape((-1,) + (1,) * (u.dim() - 1))
    guided = u + w * (c - u)  # the kernel's combine, op for op
    rescaled = rescale_noise_cfg_reference(guided, c, [phi[b] for b in on])
    new_rows = rows.clone()
    for j, b in enumerate(on):
        new_rows[b, 0] = pred.shape[0] + j
        new_rows[b, 1] = -1
    cosines = {}
    if want_cosine:
        cos = torch.nn.functional.cosine_similarity(u.reshape(len(on), -1), c.reshape(len(on), -1), dim=1)
        cosines = {b: cos[j] for j, b in enumerate(on)}
    return torch.cat([pred, rescaled.to(pred.dtype)]), new_rows, cosines


def guide_and_step(
    pred: torch.Tensor,
    sample: torch.Tensor,
    rows: torch.Tensor,
    params: torch.Tensor,
    prev: Optional[torch.Tensor] = None,
    *,
    want_x0: bool = False,
    want_cosine: bool = False,
    out: Optional[torch.Tensor] = None,
    impl: str = "auto",
    check_rows: bool = True,
    threads: int = 0,
    guidance_rescale: Optional[Rescale] = None,
) -> GuideStepResult:
    """Combine the predictions, apply the scheduler update and (optionally) the cosine, in one pass.

    Args:
        pred (`torch.Tensor` of shape `[R, ...]`): the UNet output rows (see :func:`rows_for_modes`).
        sample (`torch.Tensor` of shape `[B, ...]`): current latents.
        rows (`torch.Tensor` of shape `[B, 4]`, int32): per image ``row_a, row_b, form, 0``; on the
            device of ``sample`` or the CPU (checked when on the CPU).
        params (`torch.Tensor` of shape `[B, 8]`, float32): per image ``w, c0..c5, 0``.
        prev (`torch.Tensor` like ``sample``, optional): the previous x0, for forms ``MULTISTEP_2``
            and ``MULTISTEP_2_V``.
        want_x0 (`bool`, defaults to False): also return the predicted x0.
        want_cosine (`bool`, defaults to False): also return the per-image cosine similarity.
        out (`torch.Tensor` like ``sample``, optional): where to write the latents (may be ``sample``).
        impl (`str`, defaults to ``"auto"``): ``compiled`` (raise if unavailable), ``reference``, or
            ``auto`` (compiled when available for the device and dtype).
        check_rows (`bool`, defaults to True): check the row indices and forms of CPU ``rows``
            (the CPU kernel checks them again; the CUDA kernel cannot); callers that built
            ``rows`` themselves may skip it.
        threads (`int`, defaults to 0): CPU kernel threads; 0 uses one thread below 2**20
            elements per call and OpenMP's default above.
        guidance_rescale (`float` or `list[float]`, optional): diffusers' ``guidance_rescale``
            (``phi`` in ``[0, 1]``, for all images or per image; see
            :mod:`cfgswitch.kernels.guidance_rescale`). For guided images with ``phi > 0`` the
            combine and the rescale (a per-image reduction) run in torch first, exactly as
            diffusers' ``rescale_noise_cfg``; the kernel then converts and steps the rescaled
            prediction. Their cosines are still those of the two original rows.
    """
    if impl not in ("auto", "compiled", "reference"):
        raise ValueError(f"impl: expected 'auto', 'compiled' or 'reference', got {impl!r}")
    batch, per_image = _check(pred, sample, rows, params, prev, out, check_rows)
    rescaled_cos: Dict[int, torch.Tensor] = {}
    if guidance_rescale is not None:
        pred, rows, rescaled_cos = _rescaled_rows(pred, rows, params, guidance_rescale, want_cosine)
    result = _guide_and_step(pred, sample, rows, params, prev, want_x0, want_cosine, out, impl, threads, batch,
                             per_image)
    if rescaled_cos:
        for b, value in rescaled_cos.items():
            result.cosine[b] = value.to(result.cosine.device)
    return result


def _guide_and_step(pred, sample, rows, params, prev, want_x0, want_cosine, out, impl, threads, batch, per_image):
    """The op on checked arguments: the compiled kernel for the device and dtype, or the torch oracle."""
    use_compiled = impl != "reference" and compiled_available(sample.device, sample.dtype)
    if impl == "compiled" and not use_compiled:
        raise RuntimeError(f"guide_and_step: no compiled kernel for {sample.dtype} on {sample.device}")
    if not use_compiled:
        latents, x0, cosine = guide_and_step_reference(
            pred, sample, rows, params, prev, want_x0=want_x0, want_cosine=want_cosine
        )
        if out is not None:
            out.copy_(latents)
            latents = out
        return GuideStepResult(latents, x0, cosine)

    dev = sample.device
    pred_c, sample_c = pred.contiguous(), sample.contiguous()
    prev_c = prev.contiguous() if prev is not None else None
    target = out if out is not None and out.is_contiguous() else torch.empty_like(sample_c)
    x0 = torch.empty_like(sample_c) if want_x0 else None
    cosine = torch.empty(batch, dtype=torch.float32, device=dev) if want_cosine else None
    rows_d = rows.to(dev).contiguous()
    params_d = params.to(dev).contiguous()

    def addr(t: Optional[torch.Tensor]) -> int:
        return t.data_ptr() if t is not None else 0

    if dev.type == "cpu":
        _cpu_module().guide_and_step_f32(
            addr(pred_c), addr(rows_d), addr(params_d), addr(sample_c), addr(prev_c), addr(target), addr(x0),
            addr(cosine), batch, per_image, pred_c.shape[0], int(threads),
        )
    else:
        lib = cuda_library()
        stream = torch.cuda.current_stream(dev).cuda_stream
        ws = _workspace(lib, dev, stream, batch) if want_cosine else None
        rc = lib.cfgswitch_guide_and_step_cuda(
            addr(pred_c), addr(rows_d), addr(params_d), addr(sample_c), addr(prev_c), addr(target), addr(x0),
            addr(cosine), batch, per_image, pred_c.shape[0], _CUDA_DTYPES[sample.dtype], addr(ws), stream,
            dev.index if dev.index is not None else torch.cuda.current_device(),
        )
        if rc != 0:
            raise RuntimeError(f"guide_and_step (CUDA): {lib.cfgswitch_cuda_error_string(rc).decode()}")
    if out is not None and target is not out:
        out.copy_(target)
        target = out
    return GuideStepResult(target, x0, cosine)


__all__ = [
    "GuideStepResult",
    "PARAMS_PER_IMAGE",
    "ROWS_PER_IMAGE",
    "StepForm",
    "V_PREDICTION",
    "compiled_available",
    "cuda_library",
    "guide_and_step",
    "has_cuda_kernels",
    "pack_params",
    "pack_rows",
    "rows_for_modes",
]
