"""``cfgswitch serve`` attacked: bad values mixed into concurrent good load, an oversized prompt,
SIGTERM with 8 requests in flight after heavy load, a second SIGTERM. Two real Triton servers
(PyTriton), 127.0.0.1 only, with the default limits (max image side = 2 x the tiny model's 16 px,
prompts of 2,048 bytes and 77 tokens, request bodies of 1 MiB): ``server`` for the load, the 200 MB
prompts and the second SIGTERM (which stops it), ``drain_server`` for heavy load (good and refused
requests), then SIGTERM with 8 requests in flight.

Tolerances: good requests are checked against direct ``generate`` of the same image within one
uint8 level (they run merged with others, whose batched float results differ by ~1e-6).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from cfgswitch.output import to_uint8  # noqa: E402
from cfgswitch.serving.client import ServingClient, ServingError  # noqa: E402
from cfgswitch.serving.process import start_serve  # noqa: E402

DRAIN_S = 20
GOOD_PER_CLIENT = 30
GOOD_CLIENTS = 8  # 4 HTTP + 4 gRPC: 240 good requests
#: Bad requests per bad client (2 clients, interleaved with the good load).
BAD_PER_CLIENT = 200


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``cfgswitch serve`` of the tiny model with the default limits (stopped by ``test_zz_...``)."""
    work = tmp_path_factory.mktemp("serve-hardening")
    proc = start_serve(str(tiny_model_dir), work, ["--max-queue-delay-us", "20000", "--default-steps", "2",
                                                   "--drain-timeout", str(DRAIN_S)])
    try:
        proc.wait_ready("cfgswitch", timeout_s=180)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        proc.kill_session()


def _all_nine(prompt, seed, over=None):
    """A request that sends every input, as the issue's clients did (``over`` replaces some values)."""
    values = {"prompt": prompt, "negative_prompt": "blurry", "seed": seed, "steps": 1, "guidance_scale": 7.5,
              "plan": "switch:0.5", "scheduler": "ddim", "height": 16, "width": 16}
    values.update(over or {})
    return {k: [v] for k, v in values.items()}


#: Each bad value, and what its refusal must say (the limit or input it names).
BAD_CASES = [
    (dict(steps=0), r"^InvalidArgumentError: steps: expected an integer in \[1, 100\] \(the server's --max-steps\)"),
    (dict(steps=101), r"steps: expected an integer in \[1, 100\]"),
    (dict(guidance_scale=float("nan")), r"guidance_scale: expected a finite number >= 0, got nan"),
    (dict(plan="switch:abc"), r"^PlanParseError: plan: expected a plan string"),
    (dict(scheduler="heun"), r"^UnknownSchedulerError: scheduler: expected a scheduler that calls the model once"),
    (dict(height=15, width=15), r"height: expected a multiple of the VAE factor 2, got 15"),
    (dict(height=64, width=64), r"height: expected an integer in \[2, 32\] \(the server's --max-image-side\), got 64"),
    (dict(seed=-4), r"seed: expected an integer in \[0, "),
    (dict(prompt="x" * 2049), r"prompt: expected at most 2048 bytes \(the server's --max-prompt-bytes\), got '2049 bytes'"),
    (dict(prompt="cat " * 100), r"prompt: expected at most 77 tokens \(the server's --max-prompt-tokens"),
    (dict(negative_prompt="dog " * 100), r"negative_prompt: expected at most 77 tokens"),
    (dict(prompt=b"\xff\xfe"), r"prompt: expected UTF-8 text"),
]


def _direct(sampler, prompt, seed):
    out = sampler.generate([prompt], ["blurry"], steps=1, guidance_scale=7.5, plan="switch:0.5", seed=[seed],
                           height=16, width=16, output_type="np")
    return to_uint8(out.images)[0]


def test_bad_values_mixed_into_concurrent_good_load_fail_only_themselves(server, tiny_sampler):
    good, bad, errors = {}, [], []
    stop_bad = threading.Event()
    start = threading.Barrier(GOOD_CLIENTS + 2)

    def good_client(c):
        proto = "http" if c % 2 == 0 else "grpc"
        url = server.http_url if proto == "http" else server.grpc_url
        try:
            with ServingClient(url, protocol=proto, timeout_s=300) as client:
                start.wait()
                for k in range(GOOD_PER_CLIENT):
                    seed = 10_000 + 100 * c + k
                    try:
                        out = client.infer(_all_nine(f"good {c}-{k}", seed))
                        good[(c, k)] = (seed, out["image"][0])
                    except ServingError as e:
                        errors.append(f"good request {c}-{k} failed: {e}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"client {c}: {e!r}")

    def bad_client(b):
        proto = "http" if b == 0 else "grpc"
        url = server.http_url if proto == "http" else server.grpc_url
        try:
            with ServingClient(url, protocol=proto, timeout_s=300) as client:
                start.wait()
                i = 0
                while not stop_bad.is_set() and i < BAD_PER_CLIENT:  # bounded
                    over, pattern = BAD_CASES[(i + b) % len(BAD_CASES)]
                    try:
                        client.infer(_all_nine("bad", 1, over))
                        bad.append((pattern, None))
                    except ServingError as e:
                        bad.append((pattern, e))
                    i += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"bad client {b}: {e!r}")

    threads = [threading.Thread(target=good_client, args=(c,)) for c in range(GOOD_CLIENTS)]
    bads = [threading.Thread(target=bad_client, args=(b,)) for b in range(2)]
    for t in threads + bads:
        t.start()
    for t in threads:
        t.join(600)
    stop_bad.set()
    for t in bads:
        t.join(60)
    assert errors == [], (errors[:5], server.log_text()[-6000:])
    assert len(good) == GOOD_CLIENTS * GOOD_PER_CLIENT >= 200
    assert len(bad) >= len(BAD_CASES)
    log = server.log_text()
    for pattern, e in bad:
        assert e is not None, f"a bad request was answered: {pattern}"
        assert __import__("re").search(pattern, str(e)), (pattern, str(e))
        assert e.request_id and f"request {e.request_id} refused" in log
        # No cfgswitch internals on the wire: no traceback of ours, no path of this checkout.
        assert "cfgswitch/" not in e.details and "batching.py" not in e.details and "site-packages" not in e.details
    # The good answers are right (a sample, against direct generation).
    for (c, k), (seed, image) in sorted(good.items())[::37]:
        ref = _direct(tiny_sampler, f"good {c}-{k}", seed)
        assert np.abs(image.astype(np.int16) - ref).max() <= 1, (c, k)
    # requests shared UNet calls (the step engine, the default --batching step)
    assert max(int(n) for n in __import__("re").findall(r"its UNet calls held up to (\d+) request", log)) > 1


def test_the_proxy_patches_apply_to_the_installed_pytriton():
    # cfgswitch serve loads PyTriton's proxy patched: errors answered as responses (not raised, which
    # leaks in Triton's Python backend and blocked the unload), a 0.2 s shutdown poll, 10 s handshakes.
    import pytriton

    from cfgswitch.serving.server import patch_proxy_source

    proxy = Path(pytriton.__file__).parent / "proxy"
    model_py = patch_proxy_source("model.py", (proxy / "model.py").read_bytes())
    communication = patch_proxy_source("communication.py", (proxy / "communication.py").read_bytes())
    assert model_py is not None and communication is not None, "not the PyTriton 0.7 proxy the patches know"
    compile(model_py, "model.py", "exec")
    compile(communication, "communication.py", "exec")
    assert b"raise triton_responses_or_error" not in model_py
    assert b"return [pb_utils.InferenceResponse(error=pb_utils.TritonError(" in model_py
    assert communication.count(b"flag_check_interval_s = 0.2") == 2 and b"timeout_s: float = 10.0" in communication
    assert patch_proxy_source("data.py", b"anything") == b"anything"
    assert patch_proxy_source("model.py", b"some other proxy") is None


def test_missing_prompt_is_refused_with_a_typed_error(server):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from cfgswitch.serving.client import build_inputs

    client = http.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("cfgswitch", build_inputs(http, {"seed": [1], "steps": [1]}))
    finally:
        client.close()
    details = str(info.value.message())
    reason = ServingError(details).args[0]
    assert reason.startswith("InvalidArgumentError: prompt: expected an input 'prompt'"), reason
    assert details == reason, "the error came wrapped (PyTriton's proxy frame)"


@pytest.fixture(scope="module")
def drain_server(tiny_model_dir, tmp_path_factory):
    """A second server for the drain test, which loads it heavily first (the default drain timeout is the bar)."""
    work = tmp_path_factory.mktemp("serve-drain")
    proc = start_serve(str(tiny_model_dir), work, ["--default-steps", "2", "--drain-timeout", str(DRAIN_S)])
    try:
        proc.wait_ready("cfgswitch", timeout_s=180)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        proc.kill_session()


def _rss_kb(pid: int) -> dict:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {ln.split(":")[0]: int(ln.split()[1]) for ln in lines if ln.startswith(("VmRSS:", "RssAnon:", "RssShmem:"))}


def _session_rss_mb(server) -> float:
    """Resident memory of every process of the server's session (serve, tritonserver, its stubs), MB."""
    from cfgswitch.serving.process import session_processes

    return sum(_rss_kb(pid).get("VmRSS", 0) for pid in session_processes(server.proc.pid)) / 1024


def _send_huge(server, mb: int, protocol: str, pattern: str) -> None:
    huge = "x" * (mb * 1024 * 1024)
    url = server.http_url if protocol == "http" else server.grpc_url
    with ServingClient(url, protocol=protocol, timeout_s=300) as client:
        with pytest.raises(ServingError, match=pattern):
            client.generate(huge, seed=1, steps=1)
    del huge
    time.sleep(2.0)


@pytest.mark.slow
def test_200_mb_prompt_over_http_is_refused_before_the_server_reads_it(server):
    # The front on the public HTTP port refuses the body by its Content-Length (413, the limit
    # named) before reading it: no process of the server grows. Whole server = the serve process,
    # tritonserver, its Python-backend stubs and PyTriton's tensor store (the server's session).
    with ServingClient(server.http_url) as client:  # steady state first
        client.generate("warm", seed=1, steps=1)
    time.sleep(1.0)
    serve_before, session_before = _rss_kb(server.proc.pid), _session_rss_mb(server)
    _send_huge(server, 200, "http", rf"^InvalidArgumentError: request: expected a body of at most 1048576 bytes \(the "
               rf"server's --max-request-bytes\), got '\d+ bytes' \(request id [0-9a-f]+\)$")
    serve_after, session_after = _rss_kb(server.proc.pid), _session_rss_mb(server)
    with ServingClient(server.http_url) as client:  # still serving, on a new connection
        assert client.generate("after", seed=2, steps=1).image.shape == (16, 16, 3)
    log = server.log_text()
    assert "refused: InvalidArgumentError: request: expected a body of at most 1048576 bytes" in log
    serve_rise = (serve_after["VmRSS"] - serve_before["VmRSS"]) / 1024
    session_rise = session_after - session_before
    print(f"200 MB prompt over HTTP: whole server RSS {session_before:.0f} MB -> {session_after:.0f} MB "
          f"({session_rise:+.1f} MB), serve process {serve_rise:+.1f} MB")
    assert session_rise < 50, f"the server grew by {session_rise:.0f} MB"
    assert serve_rise < 50, f"the serve process grew by {serve_rise:.0f} MB"


@pytest.mark.slow
def test_200_mb_prompt_over_grpc_is_refused_before_the_server_reads_it(server):
    # The gRPC front's receive limit refuses the message by its length prefix, unbuffered
    # (RESOURCE_EXHAUSTED, the limit in bytes named): no process of the server grows.
    with ServingClient(server.grpc_url, protocol="grpc") as client:
        client.generate("warm", seed=1, steps=1)
    time.sleep(1.0)
    serve_before, session_before = _rss_kb(server.proc.pid), _session_rss_mb(server)
    _send_huge(server, 200, "grpc", r"Received message larger than max \(\d+ vs\. 1048576\)")
    serve_after, session_after = _rss_kb(server.proc.pid), _session_rss_mb(server)
    with ServingClient(server.grpc_url, protocol="grpc") as client:  # still serving
        assert client.generate("after", seed=2, steps=1).image.shape == (16, 16, 3)
    serve_rise = (serve_after["VmRSS"] - serve_before["VmRSS"]) / 1024
    session_rise = session_after - session_before
    print(f"200 MB prompt over gRPC: whole server RSS {session_before:.0f} MB -> {session_after:.0f} MB "
          f"({session_rise:+.1f} MB), serve process {serve_rise:+.1f} MB")
    assert session_rise < 50, f"the server grew by {session_rise:.0f} MB"
    assert serve_rise < 50, f"the serve process grew by {serve_rise:.0f} MB"


@pytest.mark.slow
def test_a_prompt_under_the_request_limit_but_over_the_byte_limit_is_refused_by_the_model(server):
    # 600 kB passes the fronts (1 MiB) and reaches the model's first check, which names its own limit.
    for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with ServingClient(url, protocol=proto) as client:
            with pytest.raises(ServingError, match=r"^InvalidArgumentError: prompt: expected at most 2048 bytes \(the "
                               r"server's --max-prompt-bytes\), got '614400 bytes' \(request id [0-9a-f]+\)$"):
                client.generate("x" * 614400, seed=1, steps=1)


@pytest.mark.slow
def test_second_sigterm_stops_at_once(server):
    import signal

    proc = server
    outcomes = []

    def slow(i):
        try:
            with ServingClient(proc.http_url, timeout_s=120) as client:
                client.generate(f"slow {i}", seed=i, steps=100, height=32, width=32)
                outcomes.append("answered")
        except Exception as e:  # noqa: BLE001 - the connection drops when the server dies
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    proc.proc.send_signal(signal.SIGTERM)  # drain: would wait for 100-step 32 px requests
    time.sleep(0.5)
    t0 = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout_s=30)  # the second one
    took = time.monotonic() - t0
    for t in threads:
        t.join(60)
    log = proc.log_text()
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert took < 5, f"the second SIGTERM took {took:.1f} s"
    assert "second SIGTERM: stopping at once" in log
    assert proc.leftovers() == []
    assert len(outcomes) == 4


def _heavy_load(server, good_per_client: int = 10, bad_per_client: int = 200) -> None:
    """A server that has been working: 4 clients of good requests (HTTP and gRPC) while 2 clients
    send refused ones, concurrently (40 good, 400 refused by default)."""
    failures = []

    def client_run(c, good):
        proto = "http" if c % 2 == 0 else "grpc"
        try:
            with ServingClient(server.http_url if proto == "http" else server.grpc_url, protocol=proto) as client:
                for k in range(good_per_client if good else bad_per_client):
                    if good:
                        client.generate(f"load {c}-{k}", seed=k, steps=1)
                        continue
                    try:
                        client.infer(_all_nine("bad", 1, BAD_CASES[(c + k) % len(BAD_CASES)][0]))
                        failures.append(f"bad request {c}-{k} was answered")
                    except ServingError:
                        pass
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"client {c}: {e!r}")

    threads = [threading.Thread(target=client_run, args=(c, True)) for c in range(4)]
    threads += [threading.Thread(target=client_run, args=(c, False)) for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert failures == [], failures


def test_zz_sigterm_with_8_in_flight_after_heavy_load_drains_and_exits_0(drain_server):
    server = drain_server
    _heavy_load(server)  # 40 good and 400 refused requests: before the fix, the unload then never finished
    answered, failures = {}, []
    go = threading.Barrier(9)

    def one(i):
        proto = "http" if i % 2 == 0 else "grpc"
        url = server.http_url if proto == "http" else server.grpc_url
        try:
            with ServingClient(url, protocol=proto, timeout_s=120) as client:
                go.wait()
                image = client.generate(f"in flight {i}", seed=i, steps=10).image
                answered[i] = (time.monotonic(), image.shape)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"{i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    before = server.log_text().count("step engine: request ")
    go.wait()
    deadline = time.monotonic() + 60
    while server.log_text().count("step engine: request ") == before and time.monotonic() < deadline:
        time.sleep(0.02)  # until the first request joined the engine: 4 requests running, 4 queued in Triton
    time.sleep(0.05)
    t0 = time.monotonic()
    code = server.stop(timeout_s=DRAIN_S + 30)
    took = time.monotonic() - t0
    for t in threads:
        t.join(60)
    log = server.log_text()
    assert failures == [], failures
    assert sorted(answered) == list(range(8))
    assert all(shape == (16, 16, 3) for _, shape in answered.values())
    assert sum(when > t0 for when, _ in answered.values()) == 8, "the requests finished before SIGTERM: not in flight"
    assert code == 0, log[-3000:]
    steps = [ln[:160] for ln in log.splitlines() if "cfgswitch.serving.server" in ln or "unloaded" in ln
             or "All models" in ln or "Timeout 20" in ln or "Timeout 10" in ln or "Timeout 1:" in ln]
    if took >= DRAIN_S:
        print("\n".join(steps[-14:]))
    assert took < DRAIN_S, f"exit took {took:.1f} s"
    assert "signal SIGTERM: draining" in log and "drained in" in log and "server stopped" in log
    assert "Non-graceful termination" not in log and "Exit timeout expired" not in log
    assert "successfully unloaded 'cfgswitch'" in log, "\n".join(steps[-14:])
    assert "killed tritonserver" not in log, "the unload did not finish inside the budget"
    assert server.leftovers() == []
    print(f"SIGTERM with 8 in flight after 40 good and 400 refused requests: exit 0 after {took:.1f} s")
