"""A serving request as Triton hands it to a model: every input ``[b, 1]``, SDXL's sizes ``[b, 2]`` (shared by the serving tests)."""

from __future__ import annotations

import numpy as np


def req(**cols):
    """A request as Triton hands it over: every input ``[b, 1]`` (the size inputs ``[b, 2]``)."""
    out = {}
    for name, vals in cols.items():
        if name in ("prompt", "negative_prompt", "plan", "scheduler"):
            out[name] = np.array([[v.encode() if isinstance(v, str) else v] for v in vals], dtype=np.object_)
        elif name == "seed":
            out[name] = np.array(vals, dtype=np.int64).reshape(-1, 1)
        elif name == "guidance_scale":
            out[name] = np.array(vals, dtype=np.float32).reshape(-1, 1)
        elif name in ("original_size", "target_size", "crops_coords_top_left"):
            out[name] = np.array(vals, dtype=np.int32).reshape(-1, 2)
        else:
            out[name] = np.array(vals, dtype=np.int32).reshape(-1, 1)
    return out
