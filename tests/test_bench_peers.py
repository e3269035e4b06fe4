"""``cfgswitch bench --peers``: the peers table on the tiny model (2 steps), skipped peers, bad interpreters."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cfgswitch.cli import main
from cfgswitch.errors import InvalidArgumentError

#: Peers that every test environment has (diffusers is a dependency of cfgswitch).
ALWAYS_THERE = ("diffusers", "diffusers+cutoff")


@pytest.fixture(scope="module")
def peers_run(tiny_model_dir, tmp_path_factory):
    """One peers run through the command line: cfgswitch torch and every peer this Python has."""
    tmp = tmp_path_factory.mktemp("peers")
    rc = main(["bench", "--peers", "--model", str(tiny_model_dir), "--steps", "2", "--repeat", "1", "--warmup", "0",
               "--batch", "1,2", "--backend", "torch", "--peer-cache", str(tmp / "cache"), "--out", str(tmp / "out"),
               "--no-progress"])
    assert rc == 0
    return json.loads((tmp / "out" / "results.json").read_text()), (tmp / "out" / "report.md").read_text()


def test_table_has_installed_peers_with_agreement(peers_run):
    results, report = peers_run
    rows = {r["id"]: r for r in results["systems"]}
    assert {"cfgswitch:torch:always", "cfgswitch:torch:switch:0.5"} <= set(rows)
    for name in ALWAYS_THERE:
        assert rows[f"peer:{name}"]["available"], rows[f"peer:{name}"].get("reason")
    for row in results["systems"]:
        if not row["available"]:
            continue
        assert set(row["cells"]) == {"1", "2"}
        for b, cell in row["cells"].items():
            assert len(cell["calls_s"]) == 1 and cell["median_s"] > 0
            assert len(cell["max_abs_diff_per_image"]) == int(b)
        if row["exact"]:  # same modules, same seeds: diffusers' pipeline gives cfgswitch torch's images
            assert row["agreement_max_abs"] <= 1e-4, (row["id"], row["agreement_max_abs"])
        assert row["label"] in report
    # the cutoff is compared with cfgswitch's switch plan, the always rows with always-CFG
    assert rows["peer:diffusers+cutoff"]["plan"] == "switch:0.5" and rows["peer:diffusers"]["plan"] == "always"
    assert "| system (seconds per batch, median) | batch 1 | batch 2 |" in report


def test_skipped_peers_carry_their_install_line(peers_run):
    results, report = peers_run
    skipped = [r for r in results["systems"] if not r["available"]]
    for row in skipped:
        assert row["install"].startswith("pip install") and row["reason"]
        assert f"install: `{row['install']}`" in report
    ort_row = next(r for r in results["systems"] if r["id"] == "peer:optimum-ort")
    if not ort_row["available"]:
        assert ort_row["install"] == "pip install 'optimum-onnx[onnxruntime]'"
        assert ort_row["id"] not in {r["id"] for r in results["systems"] if r.get("cells")}


def test_bad_peer_python_is_a_typed_error(tmp_path, capsys):
    from cfgswitch.benchmarks.peers import PeerWorker, check_peer_python

    with pytest.raises(InvalidArgumentError) as e:
        check_peer_python(str(tmp_path / "no-python"))
    assert e.value.argument == "--peer-python"
    assert main(["bench", "--peers", "--peer-python", str(tmp_path / "no-python"), "--out", str(tmp_path / "o")]) == 2
    assert "--peer-python" in capsys.readouterr().err
    true = shutil.which("true")
    if true:  # an executable that is not a Python: it exits without the worker's first line
        with pytest.raises(InvalidArgumentError) as e:
            PeerWorker(true, 1, tmp_path)
        assert e.value.argument == "--peer-python"


@pytest.mark.parametrize("extra, argument", [(["--scheduler", "euler"], "--scheduler"),
                                             (["--peer-systems", "diffusers,tensorflow"], "--peer-systems"),
                                             (["--backend", "tensorrt"], "--backend")])
def test_bad_options_are_refused_before_loading(extra, argument, tmp_path, capsys):
    assert main(["bench", "--peers", "--out", str(tmp_path / "o")] + extra) == 2
    assert argument in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CFGSWITCH_PEER_PYTHON"),
                    reason="set CFGSWITCH_PEER_PYTHON to a Python with the peers (docs/benchmarks.md#peers)")
def test_every_peer_runs_and_agrees_in_its_own_environment(tmp_path):
    """The embedded model, 2 steps, every peer in the peers' own environment (about 2 minutes with its exports)."""
    out = tmp_path / "out"
    assert main(["bench", "--peers", "--peer-python", os.environ["CFGSWITCH_PEER_PYTHON"], "--steps", "2", "--repeat",
                 "1", "--warmup", "0", "--backend", "torch", "--peer-cache", str(tmp_path / "cache"), "--out", str(out),
                 "--no-progress"]) == 0
    rows = {r["id"]: r for r in json.loads((out / "results.json").read_text())["systems"]}
    for row in rows.values():
        assert row["available"], (row["id"], row.get("reason"))
        if row["exact"]:
            assert row["agreement_max_abs"] <= 1e-4, (row["id"], row["agreement_max_abs"])
    assert rows["peer:deepcache"]["agreement_max_abs"] > 1e-4  # an approximation, and labelled so
