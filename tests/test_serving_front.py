"""The request-size fronts of ``cfgswitch serve`` (``cfgswitch.serving.front``), no Triton.

HTTP, against a plain HTTP/1.1 upstream (the standard library's ``http.server``): bodies over the
limit are refused before they are read (by length, or while a chunked body streams), compressed
and ambiguous bodies are refused, and everything else passes both ways unchanged, keep-alive
included. gRPC, against a grpcio upstream: unary and streaming calls pass with their metadata and
status, and a message over the limit is refused without being buffered.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cfgswitch.serving.front import RequestSizeFront, free_port
from cfgswitch.serving.process import free_ports

LIMIT = 4096


class _Upstream(BaseHTTPRequestHandler):
    """Echoes what it read: method, path, body length and sha of the body; counts requests."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                line = self.rfile.readline()
                if not line:  # the front cut the request
                    raise ConnectionError("request cut")
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, body: bytes) -> None:
        type(self).seen.append((self.command, self.path, len(body)))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"abc", b"defgh" * 1000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        out = json.dumps({"method": self.command, "path": self.path, "length": len(body),
                          "body": body.decode(errors="replace")[:64]}).encode()
        self.send_response(200 if self.path != "/missing" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def do_POST(self):  # noqa: N802 - http.server's naming
        try:
            body = self._body()
        except ConnectionError:
            self.close_connection = True
            return
        self._answer(body)

    def do_GET(self):  # noqa: N802
        self._answer(b"")

    def do_HEAD(self):  # noqa: N802
        self._answer(b"")


@pytest.fixture(scope="module")
def front():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    f = RequestSizeFront("127.0.0.1", free_port(), upstream.server_address[1], LIMIT)
    f.start()
    yield f
    f.stop()
    upstream.shutdown()


def _conn(front) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", front.listen_port, timeout=30)


def test_requests_under_the_limit_pass_both_ways_on_one_kept_alive_connection(front):
    _Upstream.seen.clear()
    conn = _conn(front)
    body = b'{"inputs": []}' * 100
    conn.request("POST", "/v2/models/m/infer", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    first = json.loads(r.read())
    sock = conn.sock
    conn.request("GET", "/v2/health/ready")
    second = conn.getresponse()
    second_body = json.loads(second.read())
    conn.request("HEAD", "/v2")
    third = conn.getresponse()
    assert third.read() == b"" and third.status == 200
    conn.request("GET", "/missing")
    fourth = conn.getresponse()
    fourth.read()
    assert conn.sock is sock, "the connection was not kept alive"
    conn.close()
    assert r.status == 200 and first == {"method": "POST", "path": "/v2/models/m/infer", "length": len(body),
                                         "body": body.decode()[:64]}
    assert second.status == 200 and second_body["path"] == "/v2/health/ready"
    assert fourth.status == 404
    assert _Upstream.seen == [("POST", "/v2/models/m/infer", len(body)), ("GET", "/v2/health/ready", 0),
                              ("HEAD", "/v2", 0), ("GET", "/missing", 0)]


def test_a_chunked_response_streams_back_unchanged(front):
    conn = _conn(front)
    conn.request("GET", "/chunked")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"abc" + b"defgh" * 1000
    conn.close()


def test_a_chunked_request_under_the_limit_passes(front):
    _Upstream.seen.clear()
    conn = _conn(front)
    conn.request("POST", "/v2/models/m/infer", body=iter([b"x" * 1000, b"y" * 1000]),
                 headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["length"] == 2000
    conn.close()
    assert _Upstream.seen == [("POST", "/v2/models/m/infer", 2000)]


def _raw(front, head: bytes, body_pieces=(), piece=None, pieces=0) -> bytes:
    """Send a raw request (then ``pieces`` copies of ``piece``, stopping when the server closes) and read the answer."""
    s = socket.create_connection(("127.0.0.1", front.listen_port), timeout=30)
    try:
        s.sendall(head)
        try:
            for b in body_pieces:
                s.sendall(b)
            for _ in range(pieces):
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data
    finally:
        s.close()


def _error(answer: bytes):
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(front):
    _Upstream.seen.clear()
    refused = front.refused
    mb = 200
    piece = b"\0" * 65536
    before = _rss_anon_mb()
    t0 = time.monotonic()
    answer = _raw(front, b"POST /v2/models/cfgswitch/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (mb << 20), piece=piece, pieces=(mb << 20) // len(piece))
    took = time.monotonic() - t0
    rise = _rss_anon_mb() - before
    status, message = _error(answer)
    assert status == 413
    assert message.startswith(f"InvalidArgumentError: request: expected a body of at most {LIMIT} bytes (the server's "
                              f"--max-request-bytes), got '{mb << 20} bytes' (request id "), message
    assert _Upstream.seen == [], "the upstream saw the refused request"
    assert front.refused == refused + 1
    assert rise < 50, f"the front's process grew by {rise:.0f} MB"
    print(f"200 MB body refused in {took:.2f} s (the client's upload drained and dropped); process heap rise "
          f"{rise:.1f} MB")


def test_expect_100_continue_over_the_limit_is_refused_without_the_body(front):
    _Upstream.seen.clear()
    answer = _raw(front, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % (LIMIT + 1))
    assert _error(answer)[0] == 413 and _Upstream.seen == []


def test_expect_100_continue_under_the_limit_is_continued_and_forwarded(front):
    _Upstream.seen.clear()
    conn = _conn(front)
    conn.putrequest("POST", "/v2/models/m/infer")
    conn.putheader("Expect", "100-continue")
    conn.putheader("Content-Length", "5")
    conn.endheaders()
    conn.send(b"hello")
    r = conn.getresponse()  # http.client skips the interim 100
    assert r.status == 200 and json.loads(r.read())["body"] == "hello"
    conn.close()


def test_a_chunked_body_is_cut_once_it_passes_the_limit(front):
    _Upstream.seen.clear()
    chunk = b"x" * 1000
    pieces = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 20 + [b"0\r\n\r\n"]
    answer = _raw(front, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                  body_pieces=pieces)
    status, message = _error(answer)
    assert status == 413 and f"at most {LIMIT} bytes" in message and "more than 4096 bytes" in message
    time.sleep(0.2)
    assert _Upstream.seen == [], "the upstream answered a cut request"


@pytest.mark.parametrize("head, status, words", [
    (b"POST / HTTP/1.1\r\nContent-Length: 10\r\nContent-Encoding: gzip\r\n\r\n", 415, "compressed request bodies"),
    (b"POST / HTTP/1.1\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "both Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n", 400, "conflicting content-length"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "not a byte count"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "only chunked"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "request head over"),
])
def test_ambiguous_or_compressed_requests_are_refused(front, head, status, words):
    _Upstream.seen.clear()
    got, message = _error(_raw(front, head))
    assert got == status and words in message and message.startswith("RequestError: "), message
    assert _Upstream.seen == []


def test_no_upstream_gives_503():
    listen, upstream = free_ports(2)  # distinct: two free_port() calls may return the same port
    f = RequestSizeFront("127.0.0.1", listen, upstream, LIMIT)
    f.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", f.listen_port, timeout=30)
        conn.request("GET", "/v2/health/ready")
        r = conn.getresponse()
        assert r.status == 503 and "not accepting requests" in json.loads(r.read())["error"]
        conn.close()
    finally:
        f.stop()


@pytest.mark.parametrize("listen_host,upstream_host", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                                       ("localhost", "127.0.0.1")])
def test_a_front_forwarding_to_itself_is_refused(listen_host, upstream_host):
    from cfgswitch.errors import InvalidArgumentError

    port = free_port()
    with pytest.raises(InvalidArgumentError, match=f"upstream_port: expected a port other than the front's own.*got {port}"):
        RequestSizeFront(listen_host, port, port, LIMIT, upstream_host=upstream_host)


def test_a_taken_port_and_a_bad_limit_are_refused():
    from cfgswitch.errors import InvalidArgumentError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            RequestSizeFront("127.0.0.1", s.getsockname()[1], free_port(), LIMIT).start()
    with pytest.raises(InvalidArgumentError, match=r"max_request_bytes: expected an integer >= 1, got 0"):
        RequestSizeFront("127.0.0.1", free_port(), free_port(), 0)


# ----- gRPC -------------------------------------------------------------------------------------
grpc = pytest.importorskip("grpc")


class _GrpcUpstream(grpc.GenericRpcHandler):
    """Unary ``/t.S/Echo`` (length and a metadata value back, trailing metadata set), ``/t.S/Fail``
    (an INVALID_ARGUMENT), and the streaming ``/t.S/ModelStreamInfer`` (one answer per message)."""

    calls: list = []

    def service(self, details):
        name = details.method

        def echo(request, context):
            type(self).calls.append((name, len(request)))
            md = dict(context.invocation_metadata())
            context.set_trailing_metadata((("x-upstream", "yes"),))
            return b"%d:%s" % (len(request), md.get("x-token", "-").encode())

        def fail(request, context):
            type(self).calls.append((name, len(request)))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad value")

        def stream(requests, context):
            for r in requests:
                type(self).calls.append((name, len(r)))
                yield b"got " + r

        if name.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(fail if name.endswith("/Fail") else echo)


@pytest.fixture(scope="module")
def grpc_front():
    from concurrent import futures

    from cfgswitch.serving.front import GrpcSizeFront

    upstream = grpc.server(futures.ThreadPoolExecutor(4), handlers=[_GrpcUpstream()],
                           options=[("grpc.max_receive_message_length", -1)])
    port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    f = GrpcSizeFront("127.0.0.1", free_port(), port, LIMIT)
    f.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{f.listen_port}", options=[("grpc.max_send_message_length", -1)])
    yield f, channel
    channel.close()
    f.stop()
    upstream.stop(0)


def test_grpc_calls_under_the_limit_pass_with_metadata_status_and_streams(grpc_front):
    _, channel = grpc_front
    _GrpcUpstream.calls.clear()
    response, call = channel.unary_unary("/t.S/Echo").with_call(b"x" * 100, metadata=(("x-token", "abc"),))
    assert response == b"100:abc" and dict(call.trailing_metadata())["x-upstream"] == "yes"
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/t.S/Fail")(b"y")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == "bad value"
    answers = list(channel.stream_stream("/t.S/ModelStreamInfer")(iter([b"a", b"bb", b"ccc"])))
    assert answers == [b"got a", b"got bb", b"got ccc"]
    assert _GrpcUpstream.calls == [("/t.S/Echo", 100), ("/t.S/Fail", 1), ("/t.S/ModelStreamInfer", 1),
                                   ("/t.S/ModelStreamInfer", 2), ("/t.S/ModelStreamInfer", 3)]


_GRPC_CLIENT = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_send_message_length", -1)])
try:
    channel.unary_unary("/t.S/Echo")(b"\\0" * (64 << 20), timeout=60)
    print("ANSWERED")
except grpc.RpcError as e:
    print(e.code().name)
    print(e.details())
"""


def test_a_grpc_message_over_the_limit_is_refused_before_it_is_read(grpc_front):
    # The client runs in its own process: grpcio copies the 64 MB message into its own buffers, and
    # in this process that copy would be counted against the front.
    import subprocess
    import sys

    front, channel = grpc_front
    _GrpcUpstream.calls.clear()
    before = _rss_anon_mb()
    done = subprocess.run([sys.executable, "-c", _GRPC_CLIENT, f"127.0.0.1:{front.listen_port}"],
                          capture_output=True, text=True, timeout=120)
    rise = _rss_anon_mb() - before
    assert done.returncode == 0, done.stderr
    code, details = done.stdout.splitlines()[:2]
    assert code == "RESOURCE_EXHAUSTED", done.stdout
    assert f"Received message larger than max ({64 << 20} vs. {LIMIT})" in details
    assert _GrpcUpstream.calls == []
    assert rise < 50, f"the front's process grew by {rise:.0f} MB while refusing"
    assert channel.unary_unary("/t.S/Echo")(b"ok") == b"2:-"  # the front still serves


def test_a_taken_grpc_port_is_refused():
    from cfgswitch.serving.front import GrpcSizeFront

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            GrpcSizeFront("127.0.0.1", s.getsockname()[1], free_port(), LIMIT).start()
