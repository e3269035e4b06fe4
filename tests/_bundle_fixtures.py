"""Bundles exported once per test session, shared by the export, bundle and onnxruntime tests.

pytest gives each test module that imports a fixture its own fixture definition, so
the exports are cached here at module level: whichever test module asks first
exports, the others reuse the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import pytest

#: Batch sizes of the shared bundles: 1 and 3 are what the parity tests run.
BATCH_SIZES = [1, 3]
_CACHE: Dict[str, Path] = {}


def _export(key: str, tmp_path_factory, model_dir: Path, dtype: str) -> Path:
    """Export through the command line (``cfgswitch export ... --verify``), once per session."""
    if key not in _CACHE:
        from cfgswitch.cli import main

        out = tmp_path_factory.mktemp(f"bundle-{key}") / "bundle"
        rc = main(["export", str(model_dir), "--out", str(out), "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
                   "--dtype", dtype, "--verify", "--no-progress"])
        assert rc == 0, f"cfgswitch export failed with exit code {rc}"
        _CACHE[key] = out
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model exported in fp32 (batch sizes 1 and 3, 16x16 px, verified)."""
    return _export("fp32", tmp_path_factory, tiny_model_dir, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_bundle_fp16(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model exported in fp16 (batch sizes 1 and 3, 16x16 px, verified)."""
    return _export("fp16", tmp_path_factory, tiny_model_dir, dtype="fp16")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the fp32 bundle that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def ort_sampler(tiny_bundle):
    """The fp32 bundle loaded on ONNX Runtime's CPU provider (2 threads)."""
    from cfgswitch import Sampler

    return Sampler.load(tiny_bundle, backend="onnxruntime", threads=2)
