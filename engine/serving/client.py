"""A small client of both serving paths (tritonclient, HTTP or gRPC).

Example::

    from cfgswitch.serving.client import ServingClient

    with ServingClient("127.0.0.1:8000", protocol="http") as client:
        result = client.generate("a red fox in the snow", seed=1, steps=30, plan="switch:0.5")
    result.image  # uint8 array [H, W, 3]
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import BackendUnavailableError, CfgSwitchError, InvalidArgumentError
from .protocol import INPUTS, MODEL_NAME, OUTPUT_NAMES

PROTOCOLS = ("http", "grpc")
_INFO = {t.name: t for t in INPUTS}


class ServingError(CfgSwitchError):
    """The server answered a request with an error.

    The message is the server's reason (the last ``...Error: ...`` line of what Triton
    sent, with the wrappers of Triton's Python backend peeled off); :attr:`details` keeps
    the whole text and :attr:`request_id` the id the server logged it under (or ``None``).
    """

    def __init__(self, details: str) -> None:
        self.details = details
        reason = error_reason(details)
        found = re.search(r"\(request id ([0-9a-f]+)\)\s*$", reason)
        self.request_id: Optional[str] = found.group(1) if found else None
        super().__init__(reason)


def _typed_head(head: str) -> bool:
    return bool(head) and " " not in head and head.split(".")[-1].endswith(("Error", "Exception"))


def error_reason(text: str) -> str:
    """The one-line reason in a Triton error message (PyTriton's proxy wraps it in a short traceback)."""
    lines = [ln.strip() for ln in str(text).replace("\\n", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        head, sep, rest = ln.partition(": ")
        if sep and _typed_head(head):
            # "c_python_backend_utils.TritonModelException: InvalidArgumentError: steps: ..." -> the inner one
            while True:
                inner, sep2, more = rest.partition(": ")
                if not (sep2 and _typed_head(inner) and head.split(".")[-1] in ("TritonModelException", "TritonError")):
                    break
                head, rest = inner, more
            return f"{head.split('.')[-1]}: {rest}"
    return lines[-1] if lines else str(text)


@dataclass
class ServedImage:
    """One image returned by the server.

    Attributes:
        image (`np.ndarray`): ``[H, W, 3]`` uint8.
        cfg_steps (`int`): steps that ran guided.
        late_steps (`int`): steps that ran one prediction per image.
    """

    image: np.ndarray
    cfg_steps: int
    late_steps: int


def build_inputs(module: Any, values: Dict[str, Sequence[Any]]) -> List[Any]:
    """tritonclient ``InferInput`` objects for ``{input name: one value per image}`` (``None`` values dropped)."""
    inputs = []
    for name, column in values.items():
        if column is None:
            continue
        info = _INFO[name]
        if info.triton_dtype == "BYTES":
            arr = np.array([[v.encode("utf-8") if isinstance(v, str) else v] for v in column], dtype=np.object_)
        else:
            arr = np.asarray(column, dtype=info.numpy_dtype).reshape(-1, info.dims[0])
        inp = module.InferInput(name, list(arr.shape), info.triton_dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


class ServingClient:
    """A tritonclient connection to ``cfgswitch serve`` (model ``cfgswitch``) or to a repository's
    ``cfgswitch_pipeline`` model.

    Args:
        url (`str`): ``HOST:PORT`` of the HTTP (8000) or gRPC (8001) endpoint.
        protocol (`str`, defaults to ``"http"``): ``http`` or ``grpc``.
        model (`str`, defaults to ``"cfgswitch"``): the model name.
        timeout_s (`float`, defaults to 600): network timeout of a request.
    """

    def __init__(self, url: str, protocol: str = "http", model: str = MODEL_NAME, timeout_s: float = 600.0) -> None:
        if protocol not in PROTOCOLS:
            raise InvalidArgumentError("protocol", "'http' or 'grpc'", protocol)
        if not isinstance(url, str) or ":" not in url or "://" in url:
            raise InvalidArgumentError("url", "HOST:PORT (no scheme)", url)
        try:
            if protocol == "http":
                import tritonclient.http as module
            else:
                import tritonclient.grpc as module
        except ImportError as e:
            raise BackendUnavailableError(f"the client needs tritonclient ({e}); install 'cfgswitch[serve]'") from e
        self.module = module
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        if protocol == "http":
            self._client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self._client = module.InferenceServerClient(url)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection (do it before the server shuts down, or it waits for it)."""
        self._client.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def is_ready(self) -> bool:
        """Whether the server is live and the model ready (False on connection errors)."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any transport error means "not ready yet"
            return False

    def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> None:
        """Block until :meth:`is_ready` (raises ``TimeoutError`` after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {self.model!r} not ready after {timeout_s:.0f} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------ inference
    def infer(self, values: Dict[str, Sequence[Any]]) -> Dict[str, np.ndarray]:
        """Send ``{input name: one value per image}``; return every output as an array.

        Raises:
            ServingError: the server answered with an error (its message).
        """
        from tritonclient.utils import InferenceServerException

        inputs = build_inputs(self.module, values)
        outputs = [self.module.InferRequestedOutput(n) for n in OUTPUT_NAMES]
        kwargs: Dict[str, Any] = {"outputs": outputs}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        try:
            result = self._client.infer(self.model, inputs, **kwargs)
        except InferenceServerException as e:
            raise ServingError(str(e.message() or e)) from None
        return {n: result.as_numpy(n) for n in OUTPUT_NAMES}

    def generate(self, prompt: Union[str, Sequence[str]], *, negative_prompt: Union[None, str, Sequence[str]] = None,
                 seed: Union[None, int, Sequence[int]] = None, steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, plan: Optional[str] = None, scheduler: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 original_size: Optional[Sequence[Any]] = None, target_size: Optional[Sequence[Any]] = None,
                 crops_coords_top_left: Optional[Sequence[Any]] = None) -> Union[ServedImage, List[ServedImage]]:
        """Generate one image (a string prompt) or one per prompt (a list); ``None`` leaves the server's default.

        An int ``seed`` with a list of prompts gives image ``i`` the seed ``seed + i``. SDXL's size
        conditioning (``original_size``, ``target_size``, ``crops_coords_top_left``) is one
        ``(a, b)`` pair for every image or a list of pairs, one per image.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        n = len(prompts)

        def col(value: Any) -> Optional[List[Any]]:
            if value is None:
                return None
            if isinstance(value, (list, tuple)):
                return list(value)
            return [value] * n

        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else col(seed)

        def pairs(value: Any) -> Optional[List[Any]]:
            if value is None:
                return None
            if len(value) and isinstance(value[0], (list, tuple)):
                return [list(v) for v in value]
            return [list(value)] * n

        out = self.infer({
            "prompt": prompts, "negative_prompt": col(negative_prompt), "seed": seeds, "steps": col(steps),
            "guidance_scale": col(guidance_scale), "plan": col(plan), "scheduler": col(scheduler),
            "height": col(height), "width": col(width), "original_size": pairs(original_size),
            "target_size": pairs(target_size), "crops_coords_top_left": pairs(crops_coords_top_left),
        })
        images = [ServedImage(out["image"][i], int(out["cfg_steps"][i, 0]), int(out["late_steps"][i, 0])) for i in range(n)]
        return images[0] if single else images


__all__ = ["PROTOCOLS", "ServedImage", "ServingClient", "ServingError", "build_inputs", "error_reason"]
