"""Running servers as child processes: ``cfgswitch serve`` and the bundled ``tritonserver`` on a
repository. Used by the tests, the benchmark and ``cfgswitch triton-repo --serve``.

Each server runs in its own session (process group), so stopping it can check that no
process of that session is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, List, Optional, Sequence

from .triton_env import pytriton_root, server_env, stub_path

logger = logging.getLogger(__name__)


def free_ports(count: int, host: str = "127.0.0.1") -> List[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_processes(sid: int) -> List[int]:
    """PIDs of live (not zombie) processes whose session id is ``sid`` (Linux ``/proc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def descendants(pid: int) -> List[int]:
    """PIDs of every live process below ``pid`` (children, their children, ...; Linux ``/proc``)."""
    parents: dict = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class ServerProcess:
    """A server started as a child process in a new session.

    Args:
        argv (`list[str]`): the command.
        http_port, grpc_port, metrics_port (`int`): the ports it was told to use.
        log_path (`Path`): where its stdout and stderr go.
        env (`dict`, optional): its environment.
    """

    def __init__(self, argv: Sequence[str], http_port: int, grpc_port: int, metrics_port: int, log_path: Path,
                 env: Optional[dict] = None) -> None:
        self.argv = list(argv)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_path = Path(log_path)
        self._log: IO[bytes] = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_text(self) -> str:
        """Everything the server wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, model: str, timeout_s: float = 180.0) -> None:
        """Wait until ``model`` is ready over HTTP; raise ``RuntimeError`` (with the log tail) if the server dies."""
        from .client import ServingClient

        deadline = time.monotonic() + timeout_s
        with ServingClient(self.http_url, model=model) as client:
            while not client.is_ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"model {model!r} not ready after {timeout_s:.0f} s:\n{self.log_text()[-4000:]}")
                time.sleep(0.25)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send ``sig``, wait for the exit, kill what is left of the session; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("server %d did not exit in %.0f s; killing its session", self.proc.pid, timeout_s)
                self.kill_session()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def leftovers(self, grace_s: float = 5.0) -> List[str]:
        """Processes still alive in the server's session after ``grace_s`` (``"PID cmdline"``; empty after :meth:`stop`)."""
        deadline = time.monotonic() + grace_s
        while True:
            pids = session_processes(self.proc.pid)
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            out.append(f"{pid} {cmd}")
        return out

    def kill_session(self) -> None:
        """SIGKILL every process of the server's session (last resort)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_env(base: Optional[dict] = None) -> dict:
    """The environment of a server child: ``OMP_WAIT_POLICY=PASSIVE`` unless set.

    OpenMP threads that spin while they wait make torch on a shared, busy CPU 10x slower or
    worse (measured on a 2-core machine running other jobs); results do not change.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def start_serve(model: str, workdir: Path, extra_args: Sequence[str] = ()) -> ServerProcess:
    """Start ``cfgswitch serve MODEL`` on free loopback ports (log in ``workdir/serve.log``)."""
    http, grpc, metrics = free_ports(3)
    argv = [sys.executable, "-m", "cfgswitch", "serve", str(model), "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", str(metrics), *extra_args]
    return ServerProcess(argv, http, grpc, metrics, Path(workdir) / "serve.log", env=child_env())


def prepare_backends(workdir: Path) -> Path:
    """A Triton backend folder with PyTriton's Python backend and the stub for this Python version."""
    src = pytriton_root() / "tritonserver" / "backends"
    dst = Path(workdir) / "backends"
    if not (dst / "python" / "triton_python_backend_stub").is_file():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        shutil.copy2(stub_path(), dst / "python" / "triton_python_backend_stub")
    return dst


def start_tritonserver(repository: Path, workdir: Optional[Path] = None, host: str = "127.0.0.1",
                       ports: Optional[Sequence[int]] = None, extra_pythonpath: Sequence[str] = (),
                       extra_args: Sequence[str] = ()) -> ServerProcess:
    """Serve a model repository with the ``tritonserver`` binary PyTriton bundles (CPU-only).

    It has the Python backend only (no ONNX Runtime or TensorRT backend): it serves the
    ``onnxruntime`` repositories of ``cfgswitch triton-repo``.

    Args:
        repository (`Path`): the model repository.
        workdir (`Path`, optional): where the backend folder and the log go (a temporary folder).
        host (`str`, defaults to ``"127.0.0.1"``): the address to listen on.
        ports (`Sequence[int]`, optional): HTTP, gRPC and metrics ports (free ones by default).
        extra_pythonpath (`Sequence[str]`): prepended to the models' ``PYTHONPATH``.
        extra_args (`Sequence[str]`): more ``tritonserver`` flags.
    """
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="cfgswitch-triton-"))
    backends = prepare_backends(work)
    http, grpc, metrics = ports if ports is not None else free_ports(3, host)
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    argv = [
        str(binary), f"--model-repository={repository}", f"--backend-directory={backends}",
        f"--http-address={host}", f"--http-port={http}", f"--grpc-address={host}", f"--grpc-port={grpc}",
        f"--metrics-address={host}", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
        "--exit-timeout-secs=30", "--strict-readiness=true", *extra_args,
    ]
    return ServerProcess(argv, http, grpc, metrics, work / "tritonserver.log",
                         env=child_env(server_env(list(extra_pythonpath))))


__all__ = ["ServerProcess", "child_env", "descendants", "free_ports", "prepare_backends", "session_processes", "start_serve", "start_tritonserver"]
