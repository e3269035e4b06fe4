"""The peers of ``cfgswitch bench --peers``, run in a worker process: JSON lines on stdin and stdout.

The peers (diffusers, optimum's ONNX Runtime pipeline, optimum-intel's OpenVINO pipeline,
DeepCache) often need other versions of transformers than cfgswitch's environment has, so
:mod:`cfgswitch.benchmarks.peers` starts this file with any Python (``--peer-python``) and talks
to it while the rounds interleave with cfgswitch's own calls. The file imports nothing of
cfgswitch at module level; the batch-correct CFG cutoff (:func:`cfgswitch.diffusers.generate_with_plan`)
is imported from the folders named by ``--cfgswitch-path`` when a cutoff peer is asked for.

Protocol (one JSON object per line; stdout carries nothing else, library output goes to stderr):

- the worker first writes ``{"ok": true, "hello": {"python": ..., "versions": {...}}}``;
- ``{"op": "setup", "model", "systems", "threads", "steps", "guidance", "height", "width",
  "batches", "plan", "cache"}`` loads every requested peer that imports and answers
  ``{"ok": true, "systems": {name: {"available", "install", "reason", "load_s"}}}``;
- ``{"op": "run", "system", "prompts", "seeds", "out"}`` runs one timed call, saves the images
  (``[B, H, W, 3]`` float32 in [0, 1]) as ``.npy`` at ``out`` and answers ``{"ok": true, "seconds"}``;
- ``{"op": "quit"}`` ends it. A failure answers ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

#: Peer systems this worker knows: name -> (modules it needs, the install line when they are missing).
PEERS: Dict[str, Dict[str, Any]] = {
    "diffusers": {"needs": ["diffusers", "transformers"], "install": "pip install diffusers transformers"},
    "diffusers+cutoff": {"needs": ["diffusers", "transformers"], "install": "pip install diffusers transformers"},
    "optimum-ort": {"needs": ["optimum.onnxruntime", "onnxruntime"], "install": "pip install 'optimum-onnx[onnxruntime]'"},
    "optimum-ort+cutoff": {"needs": ["optimum.onnxruntime", "onnxruntime"],
                           "install": "pip install 'optimum-onnx[onnxruntime]'"},
    "openvino-dynamic": {"needs": ["optimum.intel", "openvino"], "install": "pip install optimum-intel openvino"},
    "openvino-static": {"needs": ["optimum.intel", "openvino"], "install": "pip install optimum-intel openvino"},
    "deepcache": {"needs": ["DeepCache", "diffusers"], "install": "pip install DeepCache"},
}
#: DeepCache's parameters (its README's Stable Diffusion setting).
DEEPCACHE_PARAMS = {"cache_interval": 3, "cache_branch_id": 0}


def _versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {}
    for dist in ("torch", "diffusers", "transformers", "optimum", "optimum-onnx", "optimum-intel", "onnxruntime",
                 "openvino", "DeepCache", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _missing(modules: List[str]) -> Optional[str]:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import means the peer cannot run
            return f"{name}: {type(e).__name__}: {e}".splitlines()[0][:300]
    return None


class _CfgswitchFinder(importlib.abc.MetaPathFinder):
    """Makes ``import cfgswitch`` find the package folders of the calling environment."""

    def __init__(self, paths: List[str]) -> None:
        self.paths = paths

    def find_spec(self, name, path=None, target=None):
        if name != "cfgswitch":
            return None
        return importlib.util.spec_from_file_location("cfgswitch", str(Path(self.paths[0]) / "__init__.py"),
                                                      submodule_search_locations=list(self.paths))


class Worker:
    """The loaded peers and their calls (one process, one thread count)."""

    def __init__(self, cfgswitch_path: List[str]) -> None:
        self.cfgswitch_path = cfgswitch_path
        self.pipes: Dict[str, Any] = {}
        self.runs: Dict[str, Callable[[List[str], List[int]], Any]] = {}
        self.cfg: Dict[str, Any] = {}

    # ------------------------------------------------------------ loading
    def _scheduler(self, pipe: Any) -> None:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

    def _diffusers_pipe(self) -> Any:
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(self.cfg["model"], torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        self._scheduler(pipe)
        return pipe

    def _generate_with_plan(self):
        try:
            from cfgswitch.diffusers import generate_with_plan
        except ImportError:
            sys.meta_path.insert(0, _CfgswitchFinder(self.cfgswitch_path))
            from cfgswitch.diffusers import generate_with_plan
        return generate_with_plan

    def _ort_pipe(self) -> Any:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        folder = Path(self.cfg["cache"]) / f"optimum-ort-{_versions()['optimum-onnx']}"
        if not (folder / "model_index.json").is_file():
            pipe = ORTStableDiffusionPipeline.from_pretrained(self.cfg["model"], export=True)
            tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
            pipe.save_pretrained(tmp)
            os.replace(tmp, folder)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(self.cfg["threads"])
        so.inter_op_num_threads = 1
        pipe = ORTStableDiffusionPipeline.from_pretrained(folder, session_options=so, provider="CPUExecutionProvider")
        self._scheduler(pipe)
        return pipe

    def _ov_folder(self) -> Path:
        import torch
        from optimum.intel import OVStableDiffusionPipeline

        folder = Path(self.cfg["cache"]) / f"optimum-intel-ov-{_versions()['optimum-intel']}"
        if not (folder / "model_index.json").is_file():
            pipe = OVStableDiffusionPipeline.from_pretrained(self.cfg["model"], export=True, compile=False,
                                                             torch_dtype=torch.float32, load_in_8bit=False)
            tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
            pipe.save_pretrained(tmp)
            os.replace(tmp, folder)
        return folder

    def _ov_pipe(self, batch: Optional[int]) -> Any:
        from optimum.intel import OVStableDiffusionPipeline

        ov_config = {"INFERENCE_NUM_THREADS": str(int(self.cfg["threads"])), "INFERENCE_PRECISION_HINT": "f32",
                     "PERFORMANCE_HINT": "LATENCY"}
        pipe = OVStableDiffusionPipeline.from_pretrained(self._ov_folder(), compile=False, ov_config=ov_config)
        self._scheduler(pipe)
        if batch is not None:  # static: every shape fixed, the UNet at 2 * batch rows
            h, w = self.cfg["height"], self.cfg["width"]
            pipe.reshape(batch_size=batch, height=h, width=w, num_images_per_prompt=1)
            # optimum-intel reshapes the VAE decoder to num_images_per_prompt rows, not batch * that: fix it
            pipe.vae_decoder.model = pipe._reshape_vae_decoder(pipe.vae_decoder.model, h, w, batch)
        pipe.compile()
        return pipe

    def load(self, name: str) -> None:
        """Load peer ``name`` and register its call."""
        plan = self.cfg["plan"]
        if name in ("diffusers", "diffusers+cutoff"):
            if "diffusers" not in self.pipes:
                self.pipes["diffusers"] = self._diffusers_pipe()
            self.runs[name] = self._call(self.pipes["diffusers"], plan if name.endswith("+cutoff") else None)
        elif name in ("optimum-ort", "optimum-ort+cutoff"):
            if "optimum-ort" not in self.pipes:
                self.pipes["optimum-ort"] = self._ort_pipe()
            self.runs[name] = self._call(self.pipes["optimum-ort"], plan if name.endswith("+cutoff") else None)
        elif name == "openvino-dynamic":
            self.runs[name] = self._call(self._ov_pipe(None), None)
        elif name == "openvino-static":
            calls = {b: self._call(self._ov_pipe(b), None) for b in self.cfg["batches"]}
            self.runs[name] = lambda prompts, seeds: calls[len(prompts)](prompts, seeds)
        elif name == "deepcache":
            from DeepCache import DeepCacheSDHelper

            pipe = self._diffusers_pipe()  # its own pipeline: the helper patches the UNet's forward
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(**DEEPCACHE_PARAMS)
            helper.enable()
            self.pipes["deepcache"] = (pipe, helper)
            self.runs[name] = self._call(pipe, None)
        else:
            raise ValueError(f"unknown peer {name!r}")

    def _call(self, pipe: Any, plan: Optional[str]) -> Callable[[List[str], List[int]], Any]:
        import torch

        generate = self._generate_with_plan() if plan is not None else None
        cfg = self.cfg

        def run(prompts: List[str], seeds: List[int]) -> Any:
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            kw = dict(num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance"], generator=gens,
                      height=cfg["height"], width=cfg["width"], output_type="np")
            with torch.no_grad():
                if generate is None:
                    return pipe(list(prompts), **kw).images
                return generate(pipe, list(prompts), plan=plan, **kw).images

        return run

    # ------------------------------------------------------------ requests
    def setup(self, req: Dict[str, Any]) -> Dict[str, Any]:
        import torch

        self.cfg = {k: req[k] for k in ("model", "threads", "steps", "guidance", "height", "width", "batches", "plan",
                                        "cache")}
        Path(self.cfg["cache"]).mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(int(self.cfg["threads"]))
        out: Dict[str, Any] = {}
        for name in req["systems"]:
            peer = PEERS.get(name)
            if peer is None:
                out[name] = {"available": False, "install": None, "reason": f"unknown peer {name!r}"}
                continue
            why = _missing(peer["needs"])
            if why is not None:
                out[name] = {"available": False, "install": peer["install"], "reason": why}
                continue
            start = time.perf_counter()
            try:
                self.load(name)
            except Exception as e:  # noqa: BLE001 - report the peer as failed, keep the others
                traceback.print_exc(file=sys.stderr)
                out[name] = {"available": False, "install": peer["install"],
                             "reason": f"failed to load: {type(e).__name__}: {e}".splitlines()[0][:300]}
                continue
            out[name] = {"available": True, "install": peer["install"], "reason": None,
                         "load_s": time.perf_counter() - start}
        return {"ok": True, "systems": out}

    def run(self, req: Dict[str, Any]) -> Dict[str, Any]:
        import numpy as np

        call = self.runs[req["system"]]
        start = time.perf_counter()
        images = call(list(req["prompts"]), list(req["seeds"]))
        seconds = time.perf_counter() - start
        np.save(req["out"], np.asarray(images, dtype=np.float32))
        return {"ok": True, "seconds": seconds}


def serve(reply: Any, cfgswitch_path: List[str]) -> int:
    """Answer requests from stdin until ``quit`` or end of input."""
    worker = Worker(cfgswitch_path)

    def send(obj: Dict[str, Any]) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    send({"ok": True, "hello": {"python": platform.python_version(), "executable": sys.executable,
                                "versions": _versions()}})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                send({"ok": True})
                return 0
            if op == "setup":
                send(worker.setup(req))
            elif op == "run":
                send(worker.run(req))
            else:
                send({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - one failed request is answered, the worker goes on
            traceback.print_exc(file=sys.stderr)
            send({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``python peer_worker.py [--threads N] [--cfgswitch-path DIR ...]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cfgswitch-path", action="append", default=[], dest="cfgswitch_path")
    args = p.parse_args(argv)
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # libraries that print write to stderr
    sys.stdout = sys.stderr
    return serve(reply, args.cfgswitch_path)


if __name__ == "__main__":
    # Thread counts are read when the libraries load, so they are set before any import.
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[var] = sys.argv[i + 1]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
