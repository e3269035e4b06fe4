"""``cfgswitch bench --peers``: cfgswitch beside what a CPU user would pick instead, in one interleaved run.

Stages of :func:`run_peers`:

1. check the configuration, start the peer worker (:mod:`cfgswitch.benchmarks.peer_worker`, in
   ``--peer-python`` or this interpreter) and load the peers it can import; the others are
   skipped with their install line;
2. load cfgswitch on torch and on every installed bundle backend (onnxruntime, openvino), on a
   bundle exported from the same model into the cache folder;
3. run ``warmup + repeat`` rounds: each round calls every system once per batch size, the order
   rotated by one system per round and reversed every other round; warm-up rounds are not recorded;
4. compare each image with cfgswitch torch's image of the same prompt, seed and guidance
   (``always`` for always-CFG systems, the switch plan for the cutoff and switch systems):
   the agreement column; DeepCache is labelled an approximation.

The same model, prompts, seeds, steps (DDIM), guidance scale and threads (one by default) go
to every system. Times are wall seconds of one call (a whole batch: text encoder, loop, VAE),
measured where the call runs (the worker times its own calls), medians of the recorded rounds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cfgswitch.errors import BackendUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: The peer worker's source file (run by path, so any Python can run it).
WORKER_FILE = Path(__file__).resolve().parent / "peer_worker.py"
#: Seconds to wait for the worker's first line and for one answer.
HELLO_TIMEOUT_S, ANSWER_TIMEOUT_S = 120.0, 1800.0


@dataclass(frozen=True)
class SystemSpec:
    """One row of the peers table.

    Attributes:
        id (`str`): ``peer:<name>`` or ``cfgswitch:<backend>:<plan>``.
        label (`str`): the table's first column.
        exact (`bool`): the method computes the same images as cfgswitch torch (else an approximation).
        plan (`str`): ``always`` or the switch plan: the guidance of the torch images it is compared with.
    """

    id: str
    label: str
    exact: bool
    plan: str


def peer_specs(plan: str) -> List[SystemSpec]:
    """The peers, in table order."""
    return [
        SystemSpec("peer:diffusers", "diffusers `StableDiffusionPipeline`, always-CFG", True, "always"),
        SystemSpec("peer:deepcache", "diffusers + DeepCache (interval 3, branch 0; approximate)", False, "always"),
        SystemSpec("peer:diffusers+cutoff", f"diffusers + batch-correct CFG cutoff (`{plan}`, cfgswitch.diffusers)", True, plan),
        SystemSpec("peer:optimum-ort", "optimum `ORTStableDiffusionPipeline`, always", True, "always"),
        SystemSpec("peer:optimum-ort+cutoff", f"optimum ORT + the same cutoff callback (`{plan}`)", True, plan),
        SystemSpec("peer:openvino-dynamic", "OpenVINO (optimum-intel `OVStableDiffusionPipeline`), dynamic shapes, always",
                   True, "always"),
        SystemSpec("peer:openvino-static", "OpenVINO (optimum-intel), static shapes, always (cannot switch: one UNet shape)",
                   True, "always"),
    ]


def cfgswitch_specs(backends: Sequence[str], plan: str) -> List[SystemSpec]:
    """cfgswitch's rows: each backend with ``always`` and the switch plan."""
    return [SystemSpec(f"cfgswitch:{b}:{p}", f"cfgswitch {b}, `{p}`", True, p) for b in backends for p in ("always", plan)]


PEER_NAMES: Tuple[str, ...] = tuple(s.id.split(":", 1)[1] for s in peer_specs("switch:0.5"))


@dataclass
class PeersConfig:
    """What one peers run measures (the ``config`` block of ``results.json``).

    Attributes:
        model (`str` or `None`): a diffusers folder, ``None``/``default`` for the embedded model.
        steps (`int`), guidance_scale (`float`), seed (`int`): as everywhere (DDIM only).
        batches (`list[int]`): batch sizes.
        repeat (`int`), warmup (`int`): recorded and unrecorded rounds.
        threads (`int`): CPU threads of every system (cfgswitch and the peers alike).
        plan (`str`): the switch plan of cfgswitch and of the peers' cutoff.
        backends (`list[str]`, optional): cfgswitch backends (default: torch and each installed CPU bundle backend).
        peers (`list[str]`, optional): peer names (default: all of :data:`PEER_NAMES`).
        peer_python (`str`, optional): the Python that runs the peers (default: this one).
        cache (`str`, optional): folder of the exported bundle and the peers' exports (default:
            ``$CFGSWITCH_CACHE/bench-peers``).
    """

    model: Optional[str] = None
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    batches: List[int] = field(default_factory=lambda: [1, 4])
    repeat: int = 5
    warmup: int = 1
    threads: int = 1
    plan: str = "switch:0.5"
    backends: Optional[List[str]] = None
    peers: Optional[List[str]] = None
    peer_python: Optional[str] = None
    cache: Optional[str] = None


def check_peers_config(cfg: PeersConfig) -> PeersConfig:
    """Check ``cfg`` before anything loads (raises :class:`InvalidArgumentError` naming the option)."""
    from cfgswitch.plans import GuidancePlan

    for name, value, low in (("--steps", cfg.steps, 1), ("--repeat", cfg.repeat, 1), ("--warmup", cfg.warmup, 0),
                             ("--threads", cfg.threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(name, f"an integer >= {low}", value)
    if not cfg.batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in cfg.batches):
        raise InvalidArgumentError("--batch", "comma-separated positive integers", cfg.batches)
    if not cfg.guidance_scale > 1:
        raise InvalidArgumentError("--guidance", "a weight above 1 (the peers' cutoff needs CFG)", cfg.guidance_scale)
    cfg.plan = str(GuidancePlan.parse(cfg.plan))
    if cfg.peers is not None:
        unknown = [p for p in cfg.peers if p not in PEER_NAMES]
        if unknown:
            raise InvalidArgumentError("--peer-systems", f"some of {', '.join(PEER_NAMES)}", ",".join(unknown))
    if cfg.backends is not None:
        from cfgswitch.backends.registry import backend_names

        cpu = cpu_backends()
        bad = [b for b in cfg.backends if b not in cpu]
        if bad:
            raise InvalidArgumentError("--backend", f"some of {', '.join(cpu)} (of {', '.join(backend_names())})",
                                       ",".join(bad))
    cfg.peer_python = check_peer_python(cfg.peer_python)
    return cfg


def check_peer_python(path: Optional[str]) -> str:
    """The peer interpreter as an absolute path: ``path`` must be an executable file (default: this Python)."""
    if path is None:
        return sys.executable
    p = Path(path).expanduser()
    found = shutil.which(str(p)) if not p.is_absolute() and os.sep not in str(p) else None
    p = Path(found) if found else p
    if not p.is_file() or not os.access(p, os.X_OK):
        raise InvalidArgumentError("--peer-python", "the path of a Python interpreter whose environment has the peers "
                                   "(e.g. /tmp/peers/bin/python)", str(path))
    return str(p.absolute())


class PeerWorker:
    """The peer worker process: start, ``setup``, timed ``run`` calls, ``close``.

    Args:
        python (`str`): the interpreter to run :data:`WORKER_FILE` with.
        threads (`int`): CPU threads of the peers.
        work_dir (`Path`): where the images come back as ``.npy`` files.

    Raises:
        InvalidArgumentError: ``python`` did not start the worker (not a Python, too old, or it
            failed at once); the message carries the end of its error output.
    """

    def __init__(self, python: str, threads: int, work_dir: Path) -> None:
        import cfgswitch

        self.python = python
        self.work_dir = work_dir
        self.log = open(work_dir / "peer_worker.log", "w+", encoding="utf-8")
        paths = [str(p) for p in getattr(cfgswitch, "__path__", [])]
        cmd = [python, str(WORKER_FILE), "--threads", str(threads)]
        for p in paths:
            cmd += ["--cfgswitch-path", p]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                         bufsize=1)
        except OSError as e:
            self.log.close()
            raise InvalidArgumentError("--peer-python", "a Python interpreter that runs the peer worker", f"{python} ({e})") from e
        self.calls = 0
        try:
            self.hello = self._read(HELLO_TIMEOUT_S)["hello"]
        except (BackendUnavailableError, KeyError, TypeError) as e:
            tail = self.stderr_tail()
            self.close()
            raise InvalidArgumentError("--peer-python", "a Python interpreter (3.8 or newer) that runs "
                                       f"{WORKER_FILE.name}", f"{python}: {e}; {tail}") from None

    def stderr_tail(self, chars: int = 600) -> str:
        """The end of the worker's error output (its log)."""
        try:
            self.log.flush()
            self.log.seek(0)
            return self.log.read()[-chars:].strip()
        except (OSError, ValueError):
            return ""

    def _read(self, timeout: float) -> Dict[str, Any]:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise BackendUnavailableError(f"peer worker: no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise BackendUnavailableError(f"peer worker exited (code {self.proc.poll()})")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            raise BackendUnavailableError(f"peer worker: not a protocol line: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise BackendUnavailableError(f"peer worker: not a protocol line: {line[:200]!r}")
        return msg

    def ask(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Send one request, return its answer (raises :class:`BackendUnavailableError` on a failed one)."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise BackendUnavailableError(f"peer worker is gone ({e}): {self.stderr_tail()}") from e
        msg = self._read(ANSWER_TIMEOUT_S)
        if not msg.get("ok"):
            raise BackendUnavailableError(f"peer worker: {request.get('op')} failed: {msg.get('error')}")
        return msg

    def setup(self, **request: Any) -> Dict[str, Dict[str, Any]]:
        """Load the peers; ``{name: {"available", "install", "reason", "load_s"}}``."""
        return self.ask(dict(request, op="setup"))["systems"]

    def run(self, name: str, prompts: Sequence[str], seeds: Sequence[int]) -> Tuple[float, np.ndarray]:
        """One call of peer ``name``: ``(seconds, images [B, H, W, 3])``."""
        self.calls += 1
        out = self.work_dir / f"images-{self.calls}.npy"
        seconds = float(self.ask({"op": "run", "system": name, "prompts": list(prompts), "seeds": list(seeds),
                                  "out": str(out)})["seconds"])
        images = np.load(out)
        out.unlink()
        return seconds, images

    def close(self) -> None:
        """Ask the worker to quit (kill it if it does not) and close its log."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def default_cache() -> Path:
    """``$CFGSWITCH_CACHE/bench-peers`` (by default ``~/.cache/cfgswitch/bench-peers``)."""
    return Path(os.environ.get("CFGSWITCH_CACHE", Path.home() / ".cache" / "cfgswitch")) / "bench-peers"


def cpu_backends() -> List[str]:
    """The registry's backends that run on a CPU (neither TensorRT plans nor CUDA needed), in registry order."""
    from cfgswitch.backends.registry import BACKENDS

    return [n for n, e in BACKENDS.items() if not e.needs_plans and not e.needs_cuda]


def installed_backends() -> List[str]:
    """The CPU backends whose package imports (torch first)."""
    from cfgswitch.backends.registry import BACKENDS, importable

    return [b for b in cpu_backends() if importable(BACKENDS[b].module)]


def _model_cache(cache: Path, model_dir: Path) -> Path:
    from cfgswitch.export.manifest import content_hash_dir

    return cache / f"{model_dir.resolve().name}-{content_hash_dir(model_dir).split(':')[1][:12]}"


def _bundle(folder: Path, model_dir: Path, batches: List[int], notes: List[str]) -> Path:
    from cfgswitch.bundle import read_manifest
    from cfgswitch.export.exporter import check_options, export_bundle

    out = folder / ("bundle-b" + "-".join(map(str, sorted(batches))))
    if out.is_dir():
        try:
            read_manifest(out)
            return out
        except Exception as e:  # noqa: BLE001 - a damaged cached bundle is exported again
            logger.warning("bench --peers: cached bundle %s unusable (%s): exporting again", out, e)
    start = time.perf_counter()
    export_bundle(model_dir, out, check_options(batch_sizes=sorted(batches), overwrite=out.exists()), progress=False)
    notes.append(f"cfgswitch bundle exported from the model (batch sizes {sorted(batches)}) in "
                 f"{time.perf_counter() - start:.1f} s, not timed")
    return out


def _cfgswitch_calls(cfg: PeersConfig, model_dir: Path, folder: Path, backends: List[str], notes: List[str]
                     ) -> Tuple[Dict[str, Callable], Dict[str, float], Dict[str, Any], int]:
    """``({system id: call(prompts, seeds) -> (s, images)}, {id: load seconds}, {backend: info}, image side)``.

    ``backends`` starts with torch, whose model gives the image side of every system.
    """
    from cfgswitch.sampler import Sampler

    calls: Dict[str, Callable] = {}
    loads: Dict[str, float] = {}
    info: Dict[str, Any] = {}
    bundle = None
    side = 0
    for backend in backends:
        start = time.perf_counter()
        if backend == "torch":
            sampler = Sampler.from_diffusers(model_dir)
            side = sampler.spec.default_size
        else:
            bundle = bundle or _bundle(folder, model_dir, cfg.batches, notes)
            start = time.perf_counter()
            sampler = Sampler.load(bundle, backend=backend, threads=cfg.threads)
        load_s = time.perf_counter() - start
        info[backend] = dict(getattr(sampler.runners, "info", {}) or {})
        for plan in ("always", cfg.plan):
            sid = f"cfgswitch:{backend}:{plan}"
            loads[sid] = load_s

            def call(prompts, seeds, sampler=sampler, plan=plan):
                start = time.perf_counter()
                out = sampler.generate(list(prompts), steps=cfg.steps, guidance_scale=cfg.guidance_scale, scheduler="ddim",
                                       plan=plan, seed=list(seeds), height=side, width=side, output_type="np")
                return time.perf_counter() - start, np.asarray(out.images, dtype=np.float32)

            calls[sid] = call
    return calls, loads, info, side


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


def run_peers(cfg: PeersConfig, progress: bool = True, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the peers benchmark and return its results (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from cfgswitch.default_model import resolve_model
    from cfgswitch.model_loading import check_model_dir

    from .machine import machine_info, scrub_paths
    from .measure import rotate
    from .quality import is_embedded_model, prompts_for

    started = time.perf_counter()
    load_at_start = _loadavg()
    cfg = check_peers_config(cfg)
    model_dir = check_model_dir(resolve_model(cfg.model))
    notes: List[str] = []
    torch.set_num_threads(cfg.threads)
    backends = cfg.backends or installed_backends()
    if "torch" not in backends:
        notes.append("cfgswitch torch added: it is the agreement reference")
    backends = ["torch"] + [b for b in backends if b != "torch"]
    folder = _model_cache(Path(cfg.cache) if cfg.cache else default_cache(), model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    embedded = is_embedded_model(model_dir)
    prompts, _, prompt_source = prompts_for(max(cfg.batches), embedded, cfg.seed)
    seeds = [cfg.seed + i for i in range(max(cfg.batches))]

    with tempfile.TemporaryDirectory(prefix="cfgswitch-peers-") as work:
        # 1. The peers, in their worker.
        worker = PeerWorker(cfg.peer_python, cfg.threads, Path(work))
        try:
            # 2. cfgswitch (torch first: its model gives the image size of every system).
            local, loads, backend_info, height = _cfgswitch_calls(cfg, model_dir, folder, backends, notes)
            width = height
            wanted = list(cfg.peers or PEER_NAMES)
            status = worker.setup(model=str(model_dir), systems=wanted, threads=cfg.threads, steps=cfg.steps,
                                  guidance=cfg.guidance_scale, height=height, width=width, batches=sorted(cfg.batches),
                                  plan=cfg.plan, cache=str(folder / "peers"))
            specs = [s for s in peer_specs(cfg.plan) if s.id.split(":", 1)[1] in wanted] + cfgswitch_specs(backends, cfg.plan)
            calls: Dict[str, Callable] = dict(local)
            for s in specs:
                name = s.id.split(":", 1)[1]
                if s.id.startswith("peer:") and status.get(name, {}).get("available"):
                    calls[s.id] = (lambda prompts, seeds, name=name: worker.run(name, prompts, seeds))
                    loads[s.id] = float(status[name].get("load_s") or 0.0)
            timed = [s for s in specs if s.id in calls]
            # 3. The interleaved rounds.
            times: Dict[Tuple[str, int], List[float]] = {(s.id, b): [] for s in timed for b in cfg.batches}
            images: Dict[Tuple[str, int], np.ndarray] = {}
            failed: Dict[str, str] = {}
            rounds = cfg.warmup + cfg.repeat
            with tqdm(total=rounds * len(timed) * len(cfg.batches), desc="bench --peers", unit="call",
                      disable=not progress, file=sys.stderr) as bar:
                for r in range(rounds):
                    for b in cfg.batches:
                        for s in rotate(timed, r):
                            bar.update(1)
                            if s.id in failed:
                                continue
                            try:
                                seconds, imgs = calls[s.id](prompts[:b], seeds[:b])
                            except BackendUnavailableError as e:
                                if not s.id.startswith("peer:"):
                                    raise
                                failed[s.id] = f"failed during the run: {e}"[:300]
                                notes.append(f"{s.id}: {failed[s.id]} (left out of the table)")
                                continue
                            images[(s.id, b)] = imgs
                            if r >= cfg.warmup:
                                times[(s.id, b)].append(seconds)
        finally:
            log_tail = worker.stderr_tail(4000)
            worker.close()

    # 4. Agreement with cfgswitch torch of the same guidance.
    rows = []
    for s in specs:
        name = s.id.split(":", 1)[1]
        row: Dict[str, Any] = dict(asdict(s), kind="peer" if s.id.startswith("peer:") else "cfgswitch",
                                   available=s.id in calls and s.id not in failed, load_s=loads.get(s.id), cells={})
        if s.id.startswith("peer:"):
            row.update(install=status.get(name, {}).get("install"),
                       reason=failed.get(s.id) or status.get(name, {}).get("reason"))
        if row["available"]:
            for b in cfg.batches:
                ref = images[(f"cfgswitch:torch:{s.plan}", b)]
                diff = np.abs(images[(s.id, b)].astype(np.float64) - ref).reshape(b, -1).max(axis=1)
                t = times[(s.id, b)]
                row["cells"][str(b)] = {"calls_s": t, "median_s": statistics.median(t),
                                        "max_abs_diff_per_image": [float(x) for x in diff]}
            row["agreement_max_abs"] = max(max(c["max_abs_diff_per_image"]) for c in row["cells"].values())
        rows.append(row)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "cfgswitch-bench-peers",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": scrub_paths(list(argv)) if argv is not None else None,
        "machine": dict(machine_info(), load_average_at_start=load_at_start),
        "config": scrub_paths(asdict(cfg)),
        "peer_env": scrub_paths(worker.hello),
        "model": {"source": "embedded (cfgswitch.default_model)" if embedded else model_dir.name, "height": height,
                  "width": width, "scheduler": "ddim", "backend_info": scrub_paths(backend_info)},
        "prompts": {"source": prompt_source, "prompts": prompts, "seeds": seeds},
        "systems": rows,
        "notes": notes,
        "peer_worker_log_tail": log_tail if any(
            str(r.get("reason", "")).startswith("failed") for r in rows) else None,
        "elapsed_s": time.perf_counter() - started,
    }


def _fmt_s(row: Dict[str, Any], b: int) -> str:
    cell = row["cells"].get(str(b))
    return f"{cell['median_s']:.3f}" if cell else "-"


def peers_table(results: Dict[str, Any]) -> str:
    """The markdown table: system, seconds per batch (median) per batch size, agreement, exact/approx."""
    batches = results["config"]["batches"]
    head = "| system (seconds per batch, median) | " + " | ".join(f"batch {b}" for b in batches)
    head += " | agreement (max abs vs cfgswitch torch, same guidance) | method |\n"
    head += "| --- | " + " | ".join("---:" for _ in batches) + " | ---: | --- |\n"
    lines = []
    for row in results["systems"]:
        if not row["available"]:
            continue
        ref = row["id"] in ("cfgswitch:torch:always", f"cfgswitch:torch:{results['config']['plan']}")
        agree = "reference" if ref else f"{row['agreement_max_abs']:.2g}"
        lines.append(f"| {row['label']} | " + " | ".join(_fmt_s(row, b) for b in batches)
                     + f" | {agree} | {'exact' if row['exact'] else 'approximate'} |")
    return head + "\n".join(lines)


def skipped_lines(results: Dict[str, Any]) -> List[str]:
    """One line per skipped peer: its name, why, and its install line."""
    out = []
    for row in results["systems"]:
        if row["available"]:
            continue
        reason = str(row.get("reason"))
        if reason.startswith("failed"):  # it imported: the install line is not the fix (see the worker log)
            out.append(f"- {row['label']}: not run ({reason})")
        else:
            out.append(f"- {row['label']}: skipped ({reason}); install: `{row.get('install')}`")
    return out


def write_peer_results(results: Dict[str, Any], out: "str | Path") -> Dict[str, Path]:
    """Write ``results.json`` and ``report.md`` under ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json", "report": out / "report.md"}
    files["results"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    cfg, m = results["config"], results["machine"]
    env = results.get("peer_env") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    lines = [
        "# cfgswitch bench --peers",
        "",
        f"Model: {results['model']['source']} ({results['model']['height']}x{results['model']['width']} px); "
        f"{cfg['steps']} DDIM steps, guidance {cfg['guidance_scale']}, {cfg['threads']} thread(s) per system, "
        f"batches {', '.join(map(str, cfg['batches']))}; median of {cfg['repeat']} interleaved rounds "
        f"(after {cfg['warmup']} warm-up); seeds {results['prompts']['seeds'][0]}..; prompts: {results['prompts']['source']}.",
        f"Machine: {m.get('cpu_model')}, {m.get('cpu_cores')} cores; load (1, 5, 15 min) {m.get('load_average_at_start')} "
        f"at the start, {m.get('load_average_1_5_15min')} at the end.",
        f"Peers ran in Python {env.get('python')} ({versions}).",
        "",
        peers_table(results),
        "",
        "Agreement: the largest max abs difference of any image (pixels in [0, 1]) against cfgswitch torch's image "
        "of the same prompt and seed, with always-CFG for always-CFG rows and the switch plan for cutoff and "
        "switch rows.",
    ]
    skipped = skipped_lines(results)
    if skipped:
        lines += ["", "Skipped:", ""] + skipped
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    files["report"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def config_from_args(args: "argparse.Namespace") -> PeersConfig:
    """A checked :class:`~cfgswitch.benchmarks.peers.PeersConfig` from parsed arguments (no model loads)."""
    if args.bundle is not None:
        raise InvalidArgumentError("--bundle", "no bundle with --peers (give --model: every system runs the same folder)",
                                   args.bundle)
    if args.scheduler != "ddim":
        raise InvalidArgumentError("--scheduler", "ddim with --peers (every peer runs DDIM)", args.scheduler)
    try:
        batches = [int(x) for x in str(args.batch).split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError("--batch", "comma-separated positive integers", args.batch) from None
    split = (lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None)
    cfg = PeersConfig(model=args.model, steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batches=batches,
                      repeat=args.repeat, warmup=args.warmup, threads=1 if args.threads is None else args.threads,
                      plan=args.peer_plan, backends=split(args.backend), peers=split(args.peer_systems),
                      peer_python=args.peer_python, cache=args.peer_cache)
    return check_peers_config(cfg)


def run_cli(args: "argparse.Namespace") -> int:
    """``--peers``: run the peers suite, write results.json and report.md, print the table."""
    cfg = config_from_args(args)
    from cfgswitch.cli import route_library_logs

    route_library_logs()
    argv = ["cfgswitch"] + sys.argv[1:] if Path(sys.argv[0]).name in ("cfgswitch", "__main__.py") else None
    results = run_peers(cfg, progress=not args.no_progress, argv=argv)
    files = write_peer_results(results, args.out)
    print(peers_table(results))
    for line in skipped_lines(results):
        print(line)
    print(f"\nrun took {results['elapsed_s']:.1f} s; report: {files['report']}")
    return 0


__all__ = ["PEER_NAMES", "PeerWorker", "PeersConfig", "SystemSpec", "check_peer_python", "check_peers_config",
           "cfgswitch_specs", "config_from_args", "default_cache", "installed_backends", "peer_specs", "peers_table", "run_cli", "run_peers",
           "skipped_lines", "write_peer_results"]
