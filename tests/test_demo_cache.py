"""The demo's cached bundle: one an older cfgswitch wrote (refused now) is exported again, not a dead end."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")


def test_a_refused_cached_bundle_is_exported_again(tiny_model_dir, tmp_path, monkeypatch):
    from cfgswitch.bundle import read_manifest
    from cfgswitch.demo import _cached_bundle

    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path / "cache"))
    first = _cached_bundle(tiny_model_dir, 2)
    manifest = json.loads((first / "manifest.json").read_text())
    manifest.pop("files")  # as a bundle from before the seal: refused with a re-export hint
    (first / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="export"):
        read_manifest(first)
    again = _cached_bundle(tiny_model_dir, 2)
    assert again == first and "files" in read_manifest(again).manifest
