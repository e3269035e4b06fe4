"""``cfgswitch serve --batching request``: the earlier request-level path still answers, merged.

The default is the step engine (tests/test_serving_server.py); this checks the other path that
``--batching`` selects, against direct ``generate`` within one uint8 level (merged requests run in
a batch whose float results differ from one-image ones by ~1e-6).
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")

from cfgswitch.output import to_uint8  # noqa: E402
from cfgswitch.serving.client import ServingClient  # noqa: E402
from cfgswitch.serving.process import start_serve  # noqa: E402


def test_request_batching_merges_and_answers_each(tiny_model_dir, tiny_sampler, tmp_path):
    proc = start_serve(str(tiny_model_dir), tmp_path, ["--batching", "request", "--max-queue-delay-us", "200000",
                                                       "--default-steps", "3", "--no-warmup"])
    try:
        proc.wait_ready("cfgswitch", timeout_s=180)
        got, errors = {}, []

        def one(i):
            try:
                with ServingClient(proc.http_url) as client:
                    got[i] = client.generate(f"prompt {i}", seed=i, steps=3, plan="switch:0.5").image
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == [] and sorted(got) == [0, 1, 2, 3]
        for i, image in got.items():
            ref = to_uint8(tiny_sampler.generate([f"prompt {i}"], steps=3, plan="switch:0.5", seed=[i],
                                                 output_type="np").images)[0]
            assert np.abs(image.astype(np.int16) - ref).max() <= 1
        log = proc.log_text()
        assert max(int(n) for n in re.findall(r"batch of (\d+) request", log)) > 1, "requests were merged"
        assert "step engine: request" not in log
        assert proc.stop(timeout_s=60) == 0
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        proc.kill_session()
