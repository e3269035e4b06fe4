"""The tensors of the served model, one table for the server, the repository and the client.

Every input carries a leading batch axis (Triton's ``max_batch_size > 0``): a request of
``b`` images sends each input with shape ``[b, 1]``; one image is ``[1, 1]``. SDXL's size
conditioning inputs (``original_size``, ``target_size``, ``crops_coords_top_left``) carry two
ints per image: ``[b, 2]``. Row ``i`` of every input belongs to image ``i``. Outputs: ``image`` ``[b, H, W, 3]`` (uint8),
``cfg_steps`` and ``late_steps`` ``[b, 1]`` (int32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

#: Name of the model ``cfgswitch serve`` binds.
MODEL_NAME = "cfgswitch"
#: Name of the Python-backend model of a ``cfgswitch triton-repo`` repository.
PIPELINE_MODEL_NAME = "cfgswitch_pipeline"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the served model.

    Attributes:
        name (`str`): the tensor name clients use.
        triton_dtype (`str`): Triton's dtype name (``BYTES``, ``INT64``, ``INT32``, ``FP32``, ``UINT8``).
        dims (`tuple[int, ...]`): the shape after the batch axis (``-1`` is variable).
        optional (`bool`): inputs only: may be left out (the default in ``doc`` applies).
        doc (`str`): what it means, for docs and error messages.
    """

    name: str
    triton_dtype: str
    dims: Tuple[int, ...]
    optional: bool = False
    doc: str = ""

    @property
    def numpy_dtype(self) -> type:
        """The numpy dtype of the tensor (``object`` holds BYTES)."""
        return _NUMPY[self.triton_dtype]


_NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}

INPUTS: Tuple[TensorInfo, ...] = (
    TensorInfo("prompt", "BYTES", (1,), False, "the prompt, UTF-8"),
    TensorInfo("negative_prompt", "BYTES", (1,), True, "the negative prompt, UTF-8 (default: none, which SD encodes as empty and SDXL as zeros)"),
    TensorInfo("seed", "INT64", (1,), True, "the image's seed (default: a random one)"),
    TensorInfo("steps", "INT32", (1,), True, "denoising steps (default: 30)"),
    TensorInfo("guidance_scale", "FP32", (1,), True, "CFG weight w (default: 7.5)"),
    TensorInfo("plan", "BYTES", (1,), True, "guidance plan string such as switch:0.5 (default: switch:0.5)"),
    TensorInfo("scheduler", "BYTES", (1,), True, "scheduler name (default: ddim)"),
    TensorInfo("height", "INT32", (1,), True, "image height in pixels (default: the model's)"),
    TensorInfo("width", "INT32", (1,), True, "image width in pixels (default: the model's)"),
    TensorInfo("original_size", "INT32", (2,), True,
               "SDXL only: (height, width) the image is said to come from (default: the image size)"),
    TensorInfo("target_size", "INT32", (2,), True, "SDXL only: (height, width) of the target (default: the image size)"),
    TensorInfo("crops_coords_top_left", "INT32", (2,), True, "SDXL only: (top, left) of the crop (default: 0, 0)"),
)

#: The inputs of SDXL's size conditioning (two ints per image each), sent to ``generate`` by name.
SIZE_INPUTS: Tuple[str, ...] = ("original_size", "target_size", "crops_coords_top_left")

OUTPUTS: Tuple[TensorInfo, ...] = (
    TensorInfo("image", "UINT8", (-1, -1, 3), False, "the image, HxWx3 RGB"),
    TensorInfo("cfg_steps", "INT32", (1,), False, "steps run with guidance (2 UNet rows per image)"),
    TensorInfo("late_steps", "INT32", (1,), False, "steps run with one UNet row per image"),
)

INPUT_NAMES: Tuple[str, ...] = tuple(t.name for t in INPUTS)
OUTPUT_NAMES: Tuple[str, ...] = tuple(t.name for t in OUTPUTS)

__all__ = ["INPUTS", "INPUT_NAMES", "MODEL_NAME", "OUTPUTS", "OUTPUT_NAMES", "PIPELINE_MODEL_NAME", "SIZE_INPUTS",
           "TensorInfo"]
