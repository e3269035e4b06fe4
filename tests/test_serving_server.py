"""``cfgswitch serve`` against a real Triton server (PyTriton) on this CPU, tiny model.

One server is started per module as a subprocess on free loopback ports and stopped with
SIGTERM by the last test, which checks the exit and that no process of its session is left.

Tolerances: a request served alone runs the same computation as a direct ``generate`` of
one image and must match it bit for bit. Images served in a dynamic batch run in a batch of
up to 8 rows, whose float results differ from one-row results by ~1e-6 (CPU matmul
blocking), which can move a uint8 pixel by one level; those must match within 1 level, and
each must be nearer its own reference than any other image's (nothing lost or swapped).
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from cfgswitch.output import to_uint8  # noqa: E402
from cfgswitch.serving.client import ServingClient, ServingError, build_inputs  # noqa: E402
from cfgswitch.serving.process import start_serve  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A running ``cfgswitch serve`` of the tiny model (stopped by ``test_zz_sigterm_shutdown``)."""
    work = tmp_path_factory.mktemp("serve")
    proc = start_serve(str(tiny_model_dir), work, ["--max-queue-delay-us", "50000", "--default-steps", str(STEPS),
                                                   "--max-steps", "50", "--max-batch", "8", "--max-image-side", "64",
                                                   "--max-prompt-bytes", "200"])
    try:
        proc.wait_ready("cfgswitch", timeout_s=180)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        proc.kill_session()


def direct(sampler, prompt, seed, steps=STEPS, plan="switch:0.5", guidance=7.5, negative=None, size=None):
    out = sampler.generate([prompt], None if negative is None else [negative], steps=steps, guidance_scale=guidance,
                           plan=plan, seed=[seed], height=size, width=size, output_type="np")
    return to_uint8(out.images)[0], out.cfg_steps, out.late_steps


def test_one_request_is_identical_to_generate(server, tiny_sampler):
    with ServingClient(server.http_url) as client:
        got = client.generate("a red fox in the snow", seed=11, steps=STEPS, plan="switch:0.5", guidance_scale=7.5,
                              negative_prompt="blurry")
    ref, cfg, late = direct(tiny_sampler, "a red fox in the snow", 11, negative="blurry")
    assert got.image.dtype == np.uint8 and got.image.shape == ref.shape == (16, 16, 3)
    assert np.array_equal(got.image, ref)
    assert (got.cfg_steps, got.late_steps) == (cfg, late) == (2, 2)


def test_defaults_and_other_size(server, tiny_sampler):
    # steps left out: the server's --default-steps (4); plan left out: switch:0.5; 24x32 px.
    with ServingClient(server.grpc_url, protocol="grpc") as client:
        got = client.generate("a house", seed=3, height=24, width=32)
    out = tiny_sampler.generate(["a house"], steps=STEPS, plan="switch:0.5", seed=[3], height=24, width=32,
                                output_type="np")
    assert got.image.shape == (24, 32, 3)
    assert np.array_equal(got.image, to_uint8(out.images)[0])


def test_64_requests_from_8_concurrent_clients(server, tiny_sampler):
    # 8 clients (4 HTTP, 4 gRPC) x 8 requests; two plans so batches hold two groups.
    steps = 2
    jobs = [(c, k, f"prompt {c}-{k}", 1000 + 8 * c + k, "switch:0.5" if (c + k) % 2 else "always")
            for c in range(8) for k in range(8)]
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def worker(c):
        proto = "http" if c % 2 == 0 else "grpc"
        url = server.http_url if proto == "http" else server.grpc_url
        try:
            with ServingClient(url, protocol=proto) as client:
                barrier.wait()
                for (cc, k, prompt, seed, plan) in jobs:
                    if cc == c:
                        results[(c, k)] = client.generate(prompt, seed=seed, steps=steps, plan=plan)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert len(results) == 64

    # References: direct generation, in per-plan batches of 8 (per-image seeds; DESIGN.md section 4).
    refs = {}
    for plan in ("switch:0.5", "always"):
        mine = [j for j in jobs if j[4] == plan]
        for start in range(0, len(mine), 8):
            chunk = mine[start:start + 8]
            out = tiny_sampler.generate([j[2] for j in chunk], steps=steps, plan=plan, seed=[j[3] for j in chunk],
                                        output_type="np")
            for j, img in zip(chunk, to_uint8(out.images)):
                refs[(j[0], j[1])] = (img, out.cfg_steps, out.late_steps)
    keys = sorted(refs)
    stack = np.stack([refs[k][0] for k in keys]).astype(np.int16)
    for key in keys:
        got = results[key]
        ref, cfg, late = refs[key]
        assert np.abs(got.image.astype(np.int16) - ref).max() <= 1, key
        assert (got.cfg_steps, got.late_steps) == (cfg, late)
        nearest = keys[int(np.abs(stack - got.image.astype(np.int16)).reshape(len(keys), -1).sum(1).argmin())]
        assert nearest == key
    # A few checked against one-image generation, as a client would compute them.
    for key in keys[:: 16]:
        c, k = key
        job = next(j for j in jobs if j[:2] == key)
        ref, _, _ = direct(tiny_sampler, job[2], job[3], steps=steps, plan=job[4])
        assert np.abs(results[key].image.astype(np.int16) - ref).max() <= 1
    # Concurrent requests shared UNet calls (the step engine, the default --batching step).
    sizes = [int(n) for n in re.findall(r"its UNet calls held up to (\d+) request", server.log_text())]
    assert max(sizes) > 1, sizes


def _raw_infer(client_module, url, inputs):
    client = client_module.InferenceServerClient(url)
    try:
        return client.infer("cfgswitch", inputs)
    finally:
        client.close()


def test_bad_inputs_one_after_another_then_a_good_one(server, tiny_sampler):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    def values(**over):
        base = {"prompt": ["a cat"], "seed": [1], "steps": [STEPS]}
        base.update(over)
        return {k: v for k, v in base.items() if v is not None}

    with ServingClient(server.http_url) as client:
        value_cases = [
            (values(steps=[0]), r"steps: expected an integer in \[1, 50\]"),
            (values(steps=[51]), r"steps: expected an integer in \[1, 50\]"),
            (values(guidance_scale=[float("nan")]), r"guidance_scale: expected a finite number >= 0, got nan"),
            (values(guidance_scale=[-1.0]), r"guidance_scale: expected a finite number >= 0"),
            (values(plan=["switch:abc"]), r"plan: expected a plan string"),
            (values(plan=["sometimes"]), r"plan: expected a plan string"),
            (values(plan=["switch:1.5"]), r"plan: expected a valid plan"),
            (values(height=[15]), r"height: expected a multiple of the VAE factor 2, got 15"),
            (values(width=[128]), r"width: expected an integer in \[2, 64\]"),
            (values(seed=[-4]), r"seed: expected an integer in \[0, "),
            (values(scheduler=["heun"]), r"scheduler: expected a scheduler that calls the model once per step"),
            (values(prompt=["x" * 201]), r"prompt: expected at most 200 bytes"),
            (values(prompt=[b"\xff\xfe"]), r"prompt: expected UTF-8 text"),
        ]
        for vals, pattern in value_cases:
            with pytest.raises(ServingError, match=pattern):
                client.infer(vals)

    # Type, shape and presence errors, sent raw: Triton itself refuses them.
    raw_cases = []
    no_prompt = build_inputs(http, {"seed": [1], "steps": [STEPS]})
    raw_cases.append((no_prompt, r"expected 1 inputs but got 0|prompt"))
    wrong_dtype = build_inputs(http, {"prompt": ["a cat"]})
    steps_fp = http.InferInput("steps", [1, 1], "FP32")
    steps_fp.set_data_from_numpy(np.array([[4.0]], np.float32))
    raw_cases.append((wrong_dtype + [steps_fp], r"'steps' data-type is 'FP32', but model 'cfgswitch' expects 'INT32'"))
    prompt_2d = http.InferInput("prompt", [1, 2], "BYTES")
    prompt_2d.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    raw_cases.append(([prompt_2d], r"unexpected shape for input 'prompt'"))
    too_many = build_inputs(http, {"prompt": ["a"] * 9, "seed": list(range(9))})
    raw_cases.append((too_many, r"batch-size must be <= 8"))
    for inputs, pattern in raw_cases:
        with pytest.raises(InferenceServerException, match=pattern):
            _raw_infer(http, server.http_url, inputs)

    # The server still answers, correctly.
    with ServingClient(server.http_url) as client:
        got = client.generate("a cat after the storm", seed=77, steps=STEPS, plan="switch:0.5")
    ref, _, _ = direct(tiny_sampler, "a cat after the storm", 77)
    assert np.array_equal(got.image, ref)


def test_client_cli_writes_the_image(server, tiny_sampler, tmp_path, capsys):
    from PIL import Image

    from cfgswitch.cli import main

    out = tmp_path / "fox.png"
    code = main(["client", "a fox", "--url", server.grpc_url, "--protocol", "grpc", "--seed", "5", "--steps",
                 str(STEPS), "--plan", "switch:0.5", "--out", str(out)])
    assert code == 0
    ref, _, _ = direct(tiny_sampler, "a fox", 5)
    assert np.array_equal(np.asarray(Image.open(out)), ref)
    assert '"cfg_steps": 2' in capsys.readouterr().out
    code = main(["client", "a fox", "--url", server.http_url, "--steps", "0", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cfgswitch client: error: InvalidArgumentError: steps: expected an integer in [1, 50]")


def test_a_client_that_gives_up_mid_request_does_not_disturb_others(server, tiny_sampler):
    box = {}

    def impatient():
        with ServingClient(server.grpc_url, protocol="grpc", timeout_s=0.1) as client:
            try:
                client.generate("a long one", seed=2, steps=50)
                box["impatient"] = "answered"
            except ServingError as e:
                box["impatient"] = str(e)

    t = threading.Thread(target=impatient)
    t.start()
    with ServingClient(server.http_url) as client:
        time.sleep(0.05)
        got = client.generate("a patient one", seed=8, steps=STEPS, plan="switch:0.5")
    t.join(60)
    assert "Deadline Exceeded" in box["impatient"]
    ref, _, _ = direct(tiny_sampler, "a patient one", 8)
    assert np.array_equal(got.image, ref)  # other steps: never in the same generate call
    with ServingClient(server.grpc_url, protocol="grpc") as client:
        assert client.generate("still here", seed=1, steps=2).image.shape == (16, 16, 3)


def test_zz_sigterm_shutdown_is_clean(server):
    # A request in flight when SIGTERM arrives finishes (or fails cleanly); then nothing is left.
    box = {}

    def slow_request():
        try:
            with ServingClient(server.http_url, timeout_s=120) as client:
                box["result"] = client.generate("in flight", seed=1, steps=20)
        except Exception as e:  # noqa: BLE001 - either outcome is fine, hanging is not
            box["error"] = e

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(1.0)
    code = server.stop(timeout_s=90)
    t.join(120)
    assert not t.is_alive()
    assert "result" in box or "error" in box
    if "result" in box:
        assert box["result"].image.shape == (16, 16, 3)
    assert code == 0, server.log_text()[-3000:]
    assert server.leftovers() == []
    assert "server stopped" in server.log_text()


def test_serve_rejects_bad_arguments_before_loading(tmp_path, capsys):
    from cfgswitch.cli import main

    missing = str(tmp_path / "nothing")  # never loaded: the arguments fail first
    assert main(["serve", missing, "--http-port", "9000", "--grpc-port", "9000"]) == 2
    assert "three different ports" in capsys.readouterr().err
    assert main(["serve", missing, "--max-steps", "0"]) == 2
    assert "max-steps: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", missing, "--default-plan", "sometimes"]) == 2
    assert "plan: expected a plan string" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", missing, "--http-port", str(port)]) == 2
    assert f"--http-port: expected a free port on 127.0.0.1, got '{port} (Address already in use)'" in capsys.readouterr().err
