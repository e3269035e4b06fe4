"""Sealed bundles, the repository writer and export hygiene, attacked the way an operator would.

Every crafted manifest keeps real hashes where it names a real file, so a refusal comes from
the seal (the path resolves outside the bundle, a file is not what the manifest records), not
from a hash mismatch. The exporter is killed with a real SIGKILL in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _bundle_fixtures import bundle_copy, tiny_bundle  # noqa: F401  (fixtures)

from cfgswitch import Sampler
from cfgswitch.bundle import read_manifest, sha256_file
from cfgswitch.errors import BundleError

pytest.importorskip("onnxruntime")


def _edit_manifest(path: Path, fn) -> None:
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))


def _point_graph_at(bundle: Path, graph: str, rel: str, target: Path) -> None:
    """Make graph ``graph`` name ``rel`` with ``target``'s real sha256 and size (a forger's manifest)."""
    def edit(m):
        m["graphs"][graph].update(file=rel, sha256=sha256_file(target), bytes=target.stat().st_size)
    _edit_manifest(bundle, edit)


def _load(bundle: Path):
    return Sampler.load(bundle, backend="onnxruntime")


# ------------------------------------------------------------------ escapes
def test_dotdot_path_with_real_hash_is_refused(bundle_copy, tmp_path):  # noqa: F811
    outside = tmp_path / "outside.onnx"
    shutil.copy2(bundle_copy / "unet.onnx", outside)  # a real graph, so only the path is wrong
    rel = os.path.relpath(outside, bundle_copy)
    assert rel.startswith("..")
    _point_graph_at(bundle_copy, "unet", rel, outside)
    with pytest.raises(BundleError, match=r"manifest entry graphs\.unet\.file \(\.\./.*\) resolves outside the bundle"):
        read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        _load(bundle_copy)


def test_etc_passwd_by_dotdot_is_refused_before_any_onnx_runtime_call(bundle_copy):  # noqa: F811
    passwd = Path("/etc/passwd")
    if not passwd.is_file():
        pytest.skip("no /etc/passwd on this system")
    rel = "../" * (len(bundle_copy.resolve().parts)) + "etc/passwd"
    _point_graph_at(bundle_copy, "text_encoder", rel, passwd)
    with pytest.raises(BundleError, match=r"graphs\.text_encoder\.file .* resolves outside the bundle"):
        _load(bundle_copy)


def test_absolute_path_outside_is_refused(bundle_copy, tmp_path):  # noqa: F811
    outside = tmp_path / "abs_unet.onnx"
    shutil.copy2(bundle_copy / "unet.onnx", outside)
    _point_graph_at(bundle_copy, "unet", str(outside), outside)
    with pytest.raises(BundleError, match=r"manifest entry graphs\.unet\.file names the absolute path"):
        _load(bundle_copy)


def test_symlinked_onnx_outside_is_refused(bundle_copy, tmp_path):  # noqa: F811
    outside = tmp_path / "elsewhere" / "vae_decoder.onnx"
    outside.parent.mkdir()
    shutil.move(str(bundle_copy / "vae_decoder.onnx"), outside)
    (bundle_copy / "vae_decoder.onnx").symlink_to(outside)  # same bytes, same hash: only the link is wrong
    with pytest.raises(BundleError, match=r"graphs\.vae_decoder\.file \(vae_decoder\.onnx\) resolves through a symlink "
                       "outside the bundle"):
        _load(bundle_copy)


def test_symlink_inside_the_bundle_is_allowed(bundle_copy, tiny_bundle):  # noqa: F811
    (bundle_copy / "graphs").mkdir()
    shutil.move(str(bundle_copy / "unet.onnx"), bundle_copy / "graphs" / "unet.onnx")
    (bundle_copy / "unet.onnx").symlink_to(Path("graphs") / "unet.onnx")
    got = _load(bundle_copy).generate(["a"], steps=2, seed=3, output_type="latent").latents
    ref = _load(tiny_bundle).generate(["a"], steps=2, seed=3, output_type="latent").latents
    assert (got == ref).all()  # same graphs, same process: identical


def test_tokenizer_folder_outside_is_refused(bundle_copy, tmp_path):  # noqa: F811
    outside_tok = bundle_copy.parent / "outside_tok"
    shutil.copytree(bundle_copy / "tokenizer", outside_tok)

    def edit(m):
        m["tokenizer"] = "../outside_tok"
        for rel in [k for k in m["files"] if k.startswith("tokenizer/")]:
            m["files"]["../outside_tok/" + rel[len("tokenizer/"):]] = m["files"].pop(rel)
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=r"manifest entry tokenizer \(\.\./outside_tok\) resolves outside the bundle"):
        _load(bundle_copy)


def test_edited_tokenizer_vocab_is_refused(bundle_copy):  # noqa: F811
    # transformers 5 saves the vocabulary inside tokenizer.json (model.vocab); older ones in vocab.json.
    tok = bundle_copy / "tokenizer"
    path = tok / "vocab.json" if (tok / "vocab.json").is_file() else tok / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data if path.name == "vocab.json" else data["model"]["vocab"]
    a, b = "cat</w>", "dog</w>"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # a plausible edit: still valid, still loads without the seal
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=rf"tokenizer file tokenizer/{path.name} has sha256 .* \(edited or replaced"):
        _load(bundle_copy)


def test_file_added_to_the_tokenizer_is_refused(bundle_copy):  # noqa: F811
    name = "vocab.json" if not (bundle_copy / "tokenizer" / "vocab.json").exists() else "added_tokens.json"
    (bundle_copy / "tokenizer" / name).write_text("{}")
    with pytest.raises(BundleError, match=rf"tokenizer file tokenizer/{name} is not recorded"):
        _load(bundle_copy)


def test_edited_scheduler_config_is_refused(bundle_copy):  # noqa: F811
    cfg = bundle_copy / "scheduler" / "scheduler_config.json"
    data = json.loads(cfg.read_text())
    data["prediction_type"] = "v_prediction"
    cfg.write_text(json.dumps(data, indent=2))
    with pytest.raises(BundleError, match=r"scheduler config scheduler/scheduler_config\.json has sha256 .* \(edited"):
        _load(bundle_copy)


def test_manifest_from_before_the_seal_is_refused_with_a_re_export_hint(bundle_copy):  # noqa: F811
    _edit_manifest(bundle_copy, lambda m: m.pop("files"))
    with pytest.raises(BundleError, match=r"records no sha256 of the tokenizer and scheduler config .*"
                       r"re-export the bundle: cfgswitch export MODEL_DIR --out"):
        read_manifest(bundle_copy)


def test_the_untouched_bundle_still_loads_and_generates(tiny_bundle):  # noqa: F811
    out = _load(tiny_bundle).generate(["a red fox"], steps=2, seed=1, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


# ------------------------------------------------------------------ triton-repo
def _tree(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_triton_repo_of_a_crafted_manifest_writes_nothing_outside_out(bundle_copy, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("tritonclient.grpc")
    from cfgswitch.cli import main

    # The attack: a graph path that climbs out of the pipeline's bundle copy
    # (REPO/cfgswitch_pipeline/1/bundle/) and lands beside the repository, as ESC/unet.onnx.
    work = tmp_path / "work"
    bundle = work / "x" / "y" / "z" / "bundle"
    bundle.parent.mkdir(parents=True)
    shutil.move(str(bundle_copy), bundle)
    (work / "ESC").mkdir()
    graph = work / "ESC" / "unet.onnx"
    shutil.copy2(bundle / "unet.onnx", graph)
    _point_graph_at(bundle, "unet", "../../../../ESC/unet.onnx", graph)  # real file, real hash
    out = work / "r" / "repo"
    before = _tree(work)
    code = main(["triton-repo", str(bundle), "--out", str(out), "--engines", "onnxruntime", "--python-path", "none"])
    assert code != 0
    assert "graphs.unet.file (../../../../ESC/unet.onnx) resolves outside the bundle" in capsys.readouterr().err
    after = _tree(work)
    assert not (work / "r" / "ESC").exists()
    assert [p for p in after if p not in before] == []  # refused before anything was written


def test_destination_outside_out_is_refused(tmp_path):
    from cfgswitch.serving.repo import _destination

    out = tmp_path / "repo"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(BundleError, match="resolves outside --out"):
        _destination(out, out / "link" / "x.onnx")
    with pytest.raises(BundleError, match="resolves outside --out"):
        _destination(out, out / ".." / "x.onnx")
    assert _destination(out, out / "a" / "b") == out / "a" / "b"


# ------------------------------------------------------------------ export hygiene
_HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1]); lock.acquire(timeout=5)
print("held", flush=True)
time.sleep(120)
"""


def test_killed_export_leaves_folders_that_the_next_export_removes(tiny_model_dir, tmp_path, caplog):
    from cfgswitch.export.exporter import check_options, export_bundle

    out = tmp_path / "exports" / "b"
    out.parent.mkdir()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "cfgswitch", "export", str(tiny_model_dir), "--out", str(out),
                             "--batch-sizes", "1", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait until it has written part of the bundle
            tmps = [p for p in out.parent.glob(".b.tmp-*") if p.is_dir()]
            if tmps and (tmps[0] / "tokenizer").is_dir():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p for p in out.parent.glob(".b.tmp-*") if p.is_dir()]
    assert len(left) == 1 and not out.exists()  # what a SIGKILL leaves: the hidden folder, no bundle

    # A second leftover whose lock a live process holds: a running export's, to be left alone.
    live = out.parent / ".b.tmp-live0000"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(live) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        caplog.set_level("INFO", logger="cfgswitch.export.exporter")
        export_bundle(tiny_model_dir, out, check_options(batch_sizes=[1]), progress=False)
        assert not left[0].exists()
        assert live.is_dir()
        messages = [r.getMessage() for r in caplog.records]
        assert any(f"removed {left[0]}, left behind by an interrupted export" in m for m in messages), messages
        assert any(f"{live} belongs to an export still running" in m for m in messages), messages
    finally:
        holder.kill()
        holder.wait(10)
    assert read_manifest(out).name  # the new bundle is whole
    assert sorted(p.name for p in out.parent.iterdir()) == [".b.tmp-live0000", ".b.tmp-live0000.lock", "b"]
