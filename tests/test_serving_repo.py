"""``cfgswitch triton-repo``: repositories written through Triton's model-config protobuf.

- ``onnxruntime``: served by the ``tritonserver`` binary PyTriton bundles (CPU, Python
  backend) and queried with tritonclient: images equal direct ``Sampler.generate`` on the
  same bundle with ONNX Runtime, bit for bit (same graphs, same batch of one).
- ``onnxruntime-bls``: the ``tensorrt`` layout with ONNX Runtime stand-ins for the engines,
  which runs the BLS pipeline (``bls_runners``) on the same CPU server: same images.
- ``tensorrt``: CONFIG-ONLY. TensorRT cannot run here; the plans are placeholder bytes made
  by the real ``build_bundle`` with an injected builder, and the test checks that every
  config parses and names files that exist, with the tensor names of the graphs.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")

from cfgswitch.errors import BundleError, InvalidArgumentError  # noqa: E402
from cfgswitch.output import to_uint8  # noqa: E402
from cfgswitch.serving.client import ServingClient, ServingError  # noqa: E402
from cfgswitch.serving.limits import ServeLimits  # noqa: E402
from cfgswitch.serving.model_config import parse_config, to_text  # noqa: E402
from cfgswitch.serving.process import start_tritonserver  # noqa: E402
from cfgswitch.serving.repo import RepoOptions, check_repository, write_repository  # noqa: E402
from cfgswitch.serving.triton_env import site_dirs  # noqa: E402

STEPS = 3
PLACEHOLDER = b"placeholder plan: config-only test, not a TensorRT engine"


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    from cfgswitch.export.exporter import check_options, export_bundle

    out = tmp_path_factory.mktemp("serving-bundle") / "bundle"
    return export_bundle(tiny_model_dir, out, check_options(batch_sizes=[1, 2, 4]), progress=False)


@pytest.fixture(scope="module")
def ort_sampler(bundle):
    from cfgswitch import Sampler

    return Sampler.load(bundle, backend="onnxruntime")


def _options(engines: str, **kw) -> RepoOptions:
    limits = ServeLimits(max_steps=20, max_batch=4, max_image_side=64, default_steps=STEPS)
    return RepoOptions(engines=engines, limits=limits, max_queue_delay_us=100_000, python_paths=site_dirs(), **kw)


def _direct(sampler, prompt, seed, steps=STEPS, plan="switch:0.5"):
    out = sampler.generate([prompt], steps=steps, plan=plan, seed=[seed], output_type="np")
    return to_uint8(out.images)[0]


def _batched_executions(url: str) -> int:
    """Executions of the pipeline that ran more than one request (Triton's statistics)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("cfgswitch_pipeline")
    finally:
        client.close()
    return sum(int(b.get("compute_infer", {}).get("count", 0)) for m in stats["model_stats"]
               for b in m.get("batch_stats", []) if int(b["batch_size"]) > 1)


def _mixed_batch(server, ort_sampler):
    # A dynamic batch with a bad request in it: only that request fails (Python backend: per-request errors).
    prompts = [("a", 1, STEPS), ("b", 2, STEPS), ("bad", 3, 0), ("c", 4, STEPS)]
    answers, barrier = {}, threading.Barrier(len(prompts))

    def ask(prompt, seed, steps, proto):
        url = server.http_url if proto == "http" else server.grpc_url
        with ServingClient(url, protocol=proto, model="cfgswitch_pipeline") as c:
            barrier.wait()
            try:
                answers[prompt] = c.generate(prompt, seed=seed, steps=steps)
            except ServingError as e:
                answers[prompt] = e

    threads = [threading.Thread(target=ask, args=(*p, "http" if i % 2 else "grpc")) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert isinstance(answers["bad"], ServingError)
    assert str(answers["bad"]).startswith("InvalidArgumentError: steps: expected an integer in [1, 20]")
    refs = ort_sampler.generate(["a", "b", "c"], steps=STEPS, plan="switch:0.5", seed=[1, 2, 4], output_type="np")
    for name, ref in zip("abc", to_uint8(refs.images)):
        assert not isinstance(answers[name], Exception), answers[name]
        assert np.abs(answers[name].image.astype(np.int16) - ref).max() <= 1  # batched rows: see test_serving_server
    assert _batched_executions(server.http_url) >= 1  # the four requests did share executions


def _serve_and_check(repo, work, ort_sampler, mixed_batch=True):
    server = start_tritonserver(repo, workdir=work)
    try:
        server.wait_ready("cfgswitch_pipeline", timeout_s=180)
        with ServingClient(server.http_url, model="cfgswitch_pipeline") as client:
            got = client.generate("a lighthouse at dusk", seed=21, steps=STEPS, plan="switch:0.5")
        assert got.image.shape == (16, 16, 3) and (got.cfg_steps, got.late_steps) == (2, 1)
        assert np.array_equal(got.image, _direct(ort_sampler, "a lighthouse at dusk", 21))
        with ServingClient(server.grpc_url, protocol="grpc", model="cfgswitch_pipeline") as client:
            pair = client.generate(["a red door", "a blue door"], seed=[5, 9], steps=STEPS, plan="always")
        ref = ort_sampler.generate(["a red door", "a blue door"], steps=STEPS, plan="always", seed=[5, 9], output_type="np")
        assert [(p.cfg_steps, p.late_steps) for p in pair] == [(3, 0), (3, 0)]
        assert np.array_equal(np.stack([p.image for p in pair]), to_uint8(ref.images))  # one request, same batch of 2

        if mixed_batch:
            _mixed_batch(server, ort_sampler)
        # the step engine's counters as Triton custom metrics
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        calls = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("cfgswitch_unet_calls_total{")]
        rows = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("cfgswitch_unet_rows_total{")]
        assert calls and calls[0] > 0 and rows[0] >= calls[0], text[-2000:]
        assert any(ln.startswith("cfgswitch_queue_depth{") for ln in text.splitlines())
    finally:
        code = server.stop()
    assert code == 0, server.log_text()[-3000:]
    assert server.leftovers() == []


@pytest.mark.slow
def test_onnxruntime_repository_on_the_bundled_tritonserver(bundle, ort_sampler, tmp_path):
    repo = tmp_path / "repo"
    written = write_repository(bundle, repo, _options("onnxruntime"))
    assert sorted(written) == ["cfgswitch_pipeline"]
    assert check_repository(repo) == {"cfgswitch_pipeline": ["1/model.py", "1/bundle/manifest.json"]}
    _serve_and_check(repo, tmp_path / "work", ort_sampler)


@pytest.mark.slow
def test_bls_pipeline_with_onnxruntime_engines(bundle, ort_sampler, tmp_path):
    repo = tmp_path / "repo"
    written = write_repository(bundle, repo, _options("onnxruntime-bls"))
    assert sorted(written) == ["cfgswitch_pipeline", "text_encoder", "unet_cfg", "unet_late", "vae_decoder"]
    params = {k: v.string_value for k, v in parse_config(written["cfgswitch_pipeline"].read_text()).parameters.items()}
    assert json.loads(params["models"]) == {"text_encoder": "text_encoder", "cfg": "unet_cfg", "late": "unet_late",
                                            "vae_decoder": "vae_decoder"}
    _serve_and_check(repo, tmp_path / "work", ort_sampler, mixed_batch=False)


def _fake_build(bundle_dir, layout):
    """Record plans in the manifest with the real build code; the plan bytes are placeholders (config-only)."""
    from cfgswitch.export.build import BuildOptions, BuildTarget, build_bundle

    target = BuildTarget(tensorrt_version="10.13.0", compute_capability="9.0", gpu_name="placeholder GPU")
    return build_bundle(bundle_dir, BuildOptions(layout=layout, static=True), target=target,
                        builder=lambda *args: PLACEHOLDER, progress=False)


@pytest.mark.parametrize("layout", ["two-engines", "shared"])
def test_tensorrt_repository_configs_parse_and_name_existing_files(bundle, tmp_path, layout):
    from cfgswitch.io_specs import graph_spec

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    entry = _fake_build(copy, layout)
    repo = tmp_path / "repo"
    written = write_repository(copy, repo, _options("tensorrt", layout=layout))
    engines = ["text_encoder", "unet", "vae_decoder"] if layout == "shared" else ["text_encoder", "unet_cfg", "unet_late",
                                                                               "vae_decoder"]
    assert sorted(written) == sorted(["cfgswitch_pipeline"] + engines)
    uses = check_repository(repo)
    graph_of = {"unet_late": "unet"}
    for model in engines:
        text = written[model].read_text()
        cfg = parse_config(text)
        assert to_text(cfg) == text  # written by text_format, parses back to the same message
        assert (cfg.name, cfg.platform, cfg.max_batch_size) == (model, "tensorrt_plan", 0)
        assert uses[model] == ["1/model.plan"]
        assert (repo / model / "1" / "model.plan").read_bytes() == PLACEHOLDER
        spec = graph_spec(graph_of.get(model, model), _dims(copy))
        assert [i.name for i in cfg.input] == spec.input_names
        assert [o.name for o in cfg.output] == spec.output_names
        n_profiles = len(entry["plans"][graph_of.get(model, model)]["profiles"])
        assert list(cfg.instance_group[0].profile) == ([str(i) for i in range(n_profiles)] if n_profiles > 1 else [])
        assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    if layout == "shared":
        # One plan, profiles for 2B rows (cfg) and B rows (late) of batch sizes 1, 2, 4.
        assert len(parse_config(written["unet"].read_text()).instance_group[0].profile) == 6
    pipe = parse_config(written["cfgswitch_pipeline"].read_text())
    params = {k: v.string_value for k, v in pipe.parameters.items()}
    assert (pipe.backend, params["engines"], params["layout"], params["exact_batch"]) == ("python", "tensorrt", layout, "1")
    assert set(json.loads(params["models"]).values()) <= set(engines)
    assert [i.name for i in pipe.input][:3] == ["prompt", "negative_prompt", "seed"]
    assert [i.optional for i in pipe.input][:2] == [False, True]
    assert sorted(p.name for p in (repo / "cfgswitch_pipeline" / "1" / "bundle").iterdir()) == [
        "manifest.json", "scheduler", "tokenizer"]  # the graphs run as engine models, not in the pipeline


def _dims(bundle_dir):
    from cfgswitch.bundle import read_manifest

    return read_manifest(bundle_dir).dims


def test_tensorrt_repository_needs_built_plans(bundle, tmp_path):
    with pytest.raises(BundleError, match=r"has no TensorRT plans; build them first on the GPU host: cfgswitch build"):
        write_repository(bundle, tmp_path / "repo", _options("tensorrt"))
    with pytest.raises(InvalidArgumentError, match=r"^--engines: expected one of onnxruntime, tensorrt"):
        write_repository(bundle, tmp_path / "repo", _options("openvino"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(InvalidArgumentError, match=r"^--out: expected an empty or new folder"):
        write_repository(bundle, tmp_path / "full", _options("onnxruntime"))


def test_check_repository_finds_a_missing_file(bundle, tmp_path):
    repo = tmp_path / "repo"
    write_repository(bundle, repo, _options("onnxruntime-bls"))
    (repo / "unet_late" / "1" / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model 'unet_late' needs 1/model.onnx, which is missing"):
        check_repository(repo)
    (repo / "unet_cfg" / "config.pbtxt").write_text("name: 'unet_cfg'\nmax_batch_size: eight\n")
    with pytest.raises(BundleError, match=r"does not parse as a Triton ModelConfig"):
        check_repository(repo)


def test_triton_repo_cli(bundle, tmp_path, capsys):
    from cfgswitch.cli import main

    repo = tmp_path / "repo"
    assert main(["triton-repo", str(bundle), "--out", str(repo), "--python-path", "none", "--max-batch", "4"]) == 0
    cfg = parse_config((repo / "cfgswitch_pipeline" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and cfg.parameters["python_paths"].string_value == ""
    assert main(["triton-repo", str(bundle), "--out", str(tmp_path / "r2"), "--engines", "tensorrt", "--serve"]) == 2
    assert "--serve: expected --engines onnxruntime or onnxruntime-bls" in capsys.readouterr().err
