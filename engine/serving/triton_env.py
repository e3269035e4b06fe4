"""What the Triton server that PyTriton bundles needs from its environment on this kind of host.

The Python backend's stub process links the system's libpython; when the running
interpreter is another build, model loading fails (``'_thread.RLock' object has no
attribute '_recursion_count'``). Putting the running interpreter's ``LIBDIR`` first in
``LD_LIBRARY_PATH`` before the server starts fixes it (see NOTES.md, Triton section).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from ..errors import BackendUnavailableError

_SERVE_EXTRA = "install the serving extra: pip install 'cfgswitch[serve]'"


def pytriton_root() -> Path:
    """The folder of the installed ``pytriton`` package (raises if it is missing)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(f"serving needs nvidia-pytriton: {_SERVE_EXTRA}")
    return Path(list(spec.submodule_search_locations)[0])


def library_path(extra: Optional[List[str]] = None, base: Optional[str] = None) -> str:
    """``LD_LIBRARY_PATH`` with the interpreter's ``LIBDIR`` first, then ``extra``, then ``base``."""
    parts = [sysconfig.get_config_var("LIBDIR") or ""] + list(extra or [])
    if base is None:
        base = os.environ.get("LD_LIBRARY_PATH", "")
    parts += [p for p in base.split(os.pathsep) if p]
    seen: List[str] = []
    for p in parts:
        if p and p not in seen:
            seen.append(p)
    return os.pathsep.join(seen)


def apply_library_path() -> None:
    """Set this process's ``LD_LIBRARY_PATH`` (inherited by the server PyTriton spawns)."""
    os.environ["LD_LIBRARY_PATH"] = library_path()


def server_env(extra_pythonpath: Optional[List[str]] = None, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a ``tritonserver`` process that runs the bundled binary on a repository.

    ``LD_LIBRARY_PATH`` gets the interpreter's ``LIBDIR`` and PyTriton's ``nvidia_pytriton.libs``;
    ``PATH`` starts with this interpreter's ``bin`` folder, so the Python-backend stub runs in
    this environment (its numpy, not the system's); ``PYTHONPATH`` gets ``extra_pythonpath``.
    """
    env = dict(os.environ if base is None else base)
    libs = pytriton_root().parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = library_path([str(libs)], env.get("LD_LIBRARY_PATH", ""))
    # As PyTriton does: the stub's embedded Python resolves its prefix (and so its packages,
    # numpy first) from the first python on PATH; make that this interpreter's environment.
    bin_dir = str(Path(sys.exec_prefix) / "bin")
    env["PATH"] = os.pathsep.join([bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir])
    paths = list(extra_pythonpath or []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def site_dirs() -> List[str]:
    """The running interpreter's site-packages folders (where ``cfgswitch`` and its dependencies live)."""
    import site

    dirs = list(site.getsitepackages())
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user and Path(user).is_dir():
        dirs.append(user)
    return [d for d in dirs if Path(d).is_dir()]


def stub_path() -> Path:
    """The Python-backend stub PyTriton ships for the running Python version."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    p = pytriton_root() / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not p.is_file():
        raise BackendUnavailableError(f"nvidia-pytriton has no Python-backend stub for Python {version} (looked for {p})")
    return p


__all__ = ["apply_library_path", "library_path", "pytriton_root", "server_env", "site_dirs", "stub_path"]
