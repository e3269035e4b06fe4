"""Experiment 3: where the prompt's information lives, by swapping token embeddings between prompts.

For a pair of prompts (A, B) the text encoder's output of A is split at A's first
``[EOS]`` token into its *semantic* part (start token and words, positions ``0..e_A-1``)
and its *[EOS] part* (the ``[EOS]`` token and the padding ``[EOS]`` tokens after it,
``e_A..L-1``), as in Yi, Li, Xin and Li (2024). Composites keep the sequence length
``L``: ``compose(S, E)`` is ``S``'s semantic part followed by ``E``'s [EOS] part,
truncated to ``L`` or padded with ``E``'s last row.

Variants, each an always-guided run from the same seed as the pair's A and B images:

- ``eos_from_b``: A's semantic tokens, B's [EOS] tokens;
- ``semantic_from_b``: B's semantic tokens, A's [EOS] tokens;
- ``eos_from_b@k`` / ``prompt_b@k``: A's embeddings for steps ``< k``, then the
  ``eos_from_b`` composite (or all of B's embeddings) from step ``k`` on.

Which prompt an image follows is measured by ``toward_b`` (low-frequency distance to
A's and B's images: 0 = A, 1 = B) and, with a scorer, by the share of attributes that
match B's scene (pairs are chosen so that every scored attribute differs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .frequency import DEFAULT_CUTOFF
from .metrics import toward_b
from .trajectory import decode_images, encode_texts, eos_positions, guided_trajectory

logger = logging.getLogger(__name__)

#: Step-k variants: ``eos`` applies the [EOS] swap from step k on, ``prompt`` switches to all of B's embeddings.
K_MODES = ("eos", "prompt")
#: Default ``toward_b`` under which a late swap counts as no longer changing the result.
DEFAULT_NO_EFFECT_TOLERANCE = 0.1


def compose(semantic_src: torch.Tensor, semantic_eos: int, eos_src: torch.Tensor, eos_index: int) -> torch.Tensor:
    """``semantic_src[:semantic_eos]`` followed by ``eos_src[eos_index:]``, kept at length ``L`` (``[L, C]`` rows).

    Args:
        semantic_src (`torch.Tensor` of shape `[L, C]`): embeddings giving the start and word tokens.
        semantic_eos (`int`): first [EOS] position of ``semantic_src``'s prompt.
        eos_src (`torch.Tensor` of shape `[L, C]`): embeddings giving the [EOS] tokens.
        eos_index (`int`): first [EOS] position of ``eos_src``'s prompt.
    """
    length = semantic_src.shape[0]
    tail = eos_src[eos_index:]
    need = length - semantic_eos
    if tail.shape[0] < need:
        tail = torch.cat([tail, tail[-1:].expand(need - tail.shape[0], -1)])
    return torch.cat([semantic_src[:semantic_eos], tail[:need]])


@dataclass(frozen=True)
class _Job:
    pair: int
    variant: str
    cond: torch.Tensor
    cond_after: Optional[torch.Tensor]
    switch_at: Optional[int]


def default_k_grid(steps: int) -> List[int]:
    """Switch-in steps for the step-k variants: dense early (0..5), then sparser, ending at ``steps``."""
    fractions = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    return sorted({int(round(f * steps)) for f in fractions})


def _run_jobs(sampler, jobs: List[_Job], seeds: List[int], uncond_row: torch.Tensor, kw: Dict[str, Any],
              batch_size: int, progress: Optional[Any]) -> np.ndarray:
    images: List[Optional[np.ndarray]] = [None] * len(jobs)
    groups: Dict[Optional[int], List[int]] = {}
    for idx, job in enumerate(jobs):
        groups.setdefault(job.switch_at, []).append(idx)
    for switch_at, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            cond = torch.stack([jobs[i].cond for i in chunk])
            after = torch.stack([jobs[i].cond_after for i in chunk]) if switch_at is not None else None
            uncond = uncond_row.unsqueeze(0).expand(len(chunk), -1, -1)
            lat = guided_trajectory(sampler, uncond, cond, [seeds[jobs[i].pair] for i in chunk], cond_after=after,
                                    switch_cond_at=switch_at, **kw)
            for i, img in zip(chunk, decode_images(sampler, lat)):
                images[i] = img
            if progress is not None:
                progress.update(len(chunk))
    return np.stack(images)


def eos_experiments(
    sampler,
    pairs: Sequence[Tuple[str, str]],
    *,
    steps: int = 30,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    seed: int = 0,
    k_grid: Optional[Sequence[int]] = None,
    k_modes: Sequence[str] = K_MODES,
    cutoff: float = DEFAULT_CUTOFF,
    no_effect_tolerance: float = DEFAULT_NO_EFFECT_TOLERANCE,
    scorer: Optional[Any] = None,
    targets: Optional[Sequence[Tuple[Any, Any]]] = None,
    batch_size: int = 16,
    progress: Optional[Any] = None,
) -> Dict[str, Any]:
    """Run the swap variants for each prompt pair and say which prompt each image follows.

    Args:
        sampler (`Sampler`): the model, any backend.
        pairs (`Sequence[tuple[str, str]]`): (A, B) prompts; pair ``i`` uses seed ``seed + i``.
        steps, guidance_scale, scheduler: as for ``Sampler.generate``.
        k_grid (`Sequence[int]`, optional): switch-in steps (default :func:`default_k_grid`).
        k_modes (`Sequence[str]`, defaults to both): step-k variants to run (see :data:`K_MODES`).
        cutoff (`float`): low-pass radius of the distance behind ``toward_b``.
        no_effect_tolerance (`float`, defaults to 0.1): a step-k swap no longer changes the result
            from the first k from which mean ``toward_b`` stays at or below it; with a scorer, it
            no longer changes the attributes from the first k from which the share of attributes
            matching B stays within this tolerance of A's own image's share.
        scorer, targets (optional): an attribute scorer and one (scene A, scene B) per pair.
        batch_size (`int`, defaults to 16): images per UNet batch.
        progress (tqdm bar, optional): advanced by one per image.
    """
    from ..errors import InvalidArgumentError

    pairs = [(str(a), str(b)) for a, b in pairs]
    if not pairs:
        raise InvalidArgumentError("pairs", "at least one (A, B) prompt pair", pairs)
    for m in k_modes:
        if m not in K_MODES:
            raise InvalidArgumentError("k_modes", f"a subset of {K_MODES}", list(k_modes))
    ks = sorted({int(k) for k in (default_k_grid(steps) if k_grid is None else k_grid)})
    if any(k < 0 or k > steps for k in ks):
        raise InvalidArgumentError("k_grid", f"steps in [0, {steps}]", ks)
    prompts_a, prompts_b = [a for a, _ in pairs], [b for _, b in pairs]
    emb_a, emb_b = encode_texts(sampler, prompts_a), encode_texts(sampler, prompts_b)
    eos_a, eos_b = eos_positions(sampler, prompts_a), eos_positions(sampler, prompts_b)
    uncond_row = encode_texts(sampler, [""])[0]
    seeds = [seed + i for i in range(len(pairs))]

    jobs: List[_Job] = []
    for i in range(len(pairs)):
        eos_swap = compose(emb_a[i], eos_a[i], emb_b[i], eos_b[i])
        jobs += [_Job(i, "a", emb_a[i], None, None), _Job(i, "b", emb_b[i], None, None),
                 _Job(i, "eos_from_b", eos_swap, None, None),
                 _Job(i, "semantic_from_b", compose(emb_b[i], eos_b[i], emb_a[i], eos_a[i]), None, None)]
        for k in ks:
            if 0 < k < steps:  # k = 0 is the full swap, k = steps is A itself: both run above
                if "eos" in k_modes:
                    jobs.append(_Job(i, f"eos_from_b@{k}", emb_a[i], eos_swap, k))
                if "prompt" in k_modes:
                    jobs.append(_Job(i, f"prompt_b@{k}", emb_a[i], emb_b[i], k))
    kw = dict(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
    images = _run_jobs(sampler, jobs, seeds, uncond_row, kw, batch_size, progress)

    index = {(j.pair, j.variant): n for n, j in enumerate(jobs)}
    for i in range(len(pairs)):
        for name, full in (("eos_from_b", "eos_from_b"), ("prompt_b", "b")):
            index[(i, f"{name}@0")] = index[(i, full)]
            index[(i, f"{name}@{steps}")] = index[(i, "a")]
    img_a = images[[index[(i, "a")] for i in range(len(pairs))]]
    img_b = images[[index[(i, "b")] for i in range(len(pairs))]]
    use_scorer = scorer is not None and targets is not None

    def measure(variant: str) -> Dict[str, Any]:
        imgs = images[[index[(i, variant)] for i in range(len(pairs))]]
        tb = toward_b(imgs, img_a, img_b, cutoff)
        out: Dict[str, Any] = {"toward_b": float(tb.mean()), "toward_b_per_pair": [float(x) for x in tb]}
        if use_scorer:
            to_b = scorer.match_shares(imgs, [t[1] for t in targets])
            to_a = scorer.match_shares(imgs, [t[0] for t in targets])
            out.update(matches_b=to_b["mean"], matches_a=to_a["mean"], matches_b_by_attribute=to_b,
                       matches_a_by_attribute=to_a)
        return out

    variants = {v: measure(v) for v in ("a", "b", "eos_from_b", "semantic_from_b")}
    step_k: Dict[str, List[Dict[str, Any]]] = {}
    no_effect: Dict[str, Optional[int]] = {}
    no_effect_scored: Dict[str, Optional[int]] = {}
    # The scorer can date the swap only if it tells B's own images from A's by more than the tolerance.
    separable = use_scorer and variants["b"]["matches_b"] - variants["a"]["matches_b"] > no_effect_tolerance
    for mode in k_modes:
        name = "eos_from_b" if mode == "eos" else "prompt_b"
        curve = [{"k": k, **measure(f"{name}@{k}")} for k in ks]
        step_k[mode] = curve
        no_effect[mode] = _first_stable_below([c["toward_b"] for c in curve], ks, no_effect_tolerance)
        if separable:  # attributes: no more B-matches than A's own image shows, within the tolerance
            floor = variants["a"]["matches_b"] + no_effect_tolerance
            no_effect_scored[mode] = _first_stable_below([c["matches_b"] for c in curve], ks, floor)
    logger.info("eos: toward_b %.3f with B's [EOS], %.3f with B's semantic tokens (%d pairs)",
                variants["eos_from_b"]["toward_b"], variants["semantic_from_b"]["toward_b"], len(pairs))
    return {
        "pairs": [list(p) for p in pairs], "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale,
        "scheduler": scheduler, "cutoff": cutoff, "eos_positions": {"a": eos_a, "b": eos_b},
        "scored": use_scorer, "variants": variants, "k_grid": ks, "step_k": step_k,
        "no_effect_tolerance": no_effect_tolerance, "no_effect_from_step": no_effect,
        "no_effect_from_step_scored": no_effect_scored if separable else None,
        "scorer_separates_pairs": bool(separable) if use_scorer else None,
        "_images": {v: images[[index[(i, v)] for i in range(len(pairs))]] for v in ("a", "b", "eos_from_b", "semantic_from_b")},
    }


def _first_stable_below(values: Sequence[float], ks: Sequence[int], tolerance: float) -> Optional[int]:
    """The first ``k`` from which every value is ``<= tolerance`` (``None`` when the last one is above)."""
    found: Optional[int] = None
    for k, v in zip(reversed(list(ks)), reversed(list(values))):
        if v > tolerance:
            break
        found = k
    return found


__all__ = ["DEFAULT_NO_EFFECT_TOLERANCE", "K_MODES", "compose", "default_k_grid", "eos_experiments"]
