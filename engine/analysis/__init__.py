"""Analysis: measure when a model stops needing its prompt, and choose the switch point from it.

Experiments, each usable alone:

- :func:`trajectory_probes` (per-step low/high-frequency content of the predicted x0,
  guidance norms and cosine),
- :func:`switch_sweep` (``switch_at(f)`` against always-CFG: distances, rows and time saved,
  scorer accuracies),
- :func:`eos_experiments` ([EOS] versus semantic token swaps, and swaps from step k on),
- :func:`recommend` (the earliest switch point within a :class:`Tolerance`) and
  :func:`recommend_adaptive` (the model's adaptive threshold and minimum share of CFG steps);
  import ``recommend`` from :mod:`cfgswitch.analysis.recommend`, since the package attribute
  of that name is the submodule once it is loaded,

and :func:`run_analysis` / ``cfgswitch analyze`` run them all and write ``analysis.json``,
``recommendation.json``, ``report.md`` and plots. See ``docs/analysis.md``.

Importing this package is cheap: the experiment modules load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AnalysisConfig": "analyze",
    "run_analysis": "analyze",
    "trajectory_probes": "probes",
    "switch_sweep": "sweep",
    "eos_experiments": "eos",
    "compose": "eos",
    "recommend": "recommend",
    "recommend_adaptive": "recommend",
    "Tolerance": "recommend",
    "split_frequencies": "frequency",
    "low_pass_mask": "frequency",
    "band_energy": "frequency",
    "image_distances": "metrics",
    "guided_trajectory": "trajectory",
    "PromptSet": "scoring",
    "ShapesScorer": "scoring",
    "load_scorer": "scoring",
    "shapes_prompt_set": "scoring",
    "generic_prompt_set": "scoring",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
