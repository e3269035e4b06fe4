"""Developer install: import ``cfgswitch`` straight from this checkout, edits live.

scikit-build-core cannot map ``engine/`` to ``cfgswitch`` in an editable install,
so for development this script builds ``cfgswitch._kernels`` with CMake into
``build/dev`` and installs a small import hook (a ``.pth`` file) into the
current environment that resolves ``cfgswitch`` to ``engine/`` and its
subpackages to ``export/``, ``kernels/`` and ``benchmarks/``.
Users and CI install the package normally (``pip install .``).

Usage: ``python tools/dev_install.py [--no-build]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = '''"""cfgswitch developer import hook (written by tools/dev_install.py)."""
import importlib.abc
import importlib.util
import sys

_ROOT = {root!r}
_BUILD = {build!r}


class _CfgswitchDevFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "cfgswitch":
            return None
        return importlib.util.spec_from_file_location(
            "cfgswitch", _ROOT + "/engine/__init__.py", submodule_search_locations=[_ROOT + "/engine", _ROOT, _BUILD]
        )


sys.meta_path.insert(0, _CfgswitchDevFinder())
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="only install the import hook")
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA kernels (needs nvcc)")
    args = parser.parse_args()
    build = ROOT / "build" / "dev"
    if not args.no_build:
        import pybind11

        cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build}"]
        if args.cuda:
            cfg.append("-DCFGSWITCH_CUDA=ON")
        subprocess.run(cfg, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    (site / "cfgswitch_devhook.py").write_text(HOOK.format(root=str(ROOT), build=str(build)))
    (site / "cfgswitch_dev.pth").write_text("import cfgswitch_devhook\n")
    script = Path(sysconfig.get_paths()["scripts"]) / "cfgswitch"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom cfgswitch.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    print(f"cfgswitch now imports from {ROOT} (compiled ops from {build})")


if __name__ == "__main__":
    main()
