"""Request-size fronts for Triton's HTTP and gRPC endpoints: requests over ``--max-request-bytes``
are refused before they are read.

The Triton server that PyTriton 0.7 bundles (2.51) reads every HTTP body in full, whatever its
size, before the model sees it (it has no ``--http-max-input-size``). ``cfgswitch serve`` therefore
puts :class:`RequestSizeFront` on the public HTTP port and runs Triton's HTTP endpoint on an internal
``127.0.0.1`` port. For each request the front:

- reads the request line and headers (at most :data:`MAX_HEAD_BYTES`);
- refuses a ``Content-Length`` above the limit at once with ``413`` and a KServe-v2 error body
  (``{"error": "InvalidArgumentError: request: expected a body of at most N bytes (the server's
  --max-request-bytes), got 'M bytes' (request id ID)"}``), before reading any of the body; a
  chunked body is counted while it streams and cut (``413``, the upstream connection dropped) once
  it passes the limit; a compressed body (``Content-Encoding`` other than ``identity``) is refused
  with ``415``, since its decoded size cannot be known before Triton inflates it;
- otherwise streams the request to Triton and the answer back unchanged, in pieces of at most
  :data:`CHUNK_BYTES` (no copy of a whole body, flow-controlled both ways), keeping the client's
  connection alive as HTTP/1.1 does. Inference, health, metadata, statistics and every other
  endpoint pass through the same way.

After a refusal the connection is closed; what the client still sends is read and dropped for
at most :data:`LINGER_S` (so that it sees the 413 rather than a reset), never stored.

The front runs its own asyncio loop on a thread of the serving process; its cost per request is
a few buffer copies of at most :data:`CHUNK_BYTES` each way (not timed here).

Triton 2.51's gRPC endpoint accepts messages up to 2 GiB and has no flag to lower that (its
``--help`` lists none), so :class:`GrpcSizeFront` does the same on the public gRPC port with gRPC's
own receive limit, which refuses a message by its length prefix without buffering it, and forwards
every other call to Triton's internal gRPC port as bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Any, List, Optional, Tuple

from ..errors import InvalidArgumentError
from .admission import new_request_id

logger = logging.getLogger(__name__)

#: Default ``--max-request-bytes``: far above any valid request (9 small inputs per image, at most
#: 8 images, prompts of at most 2,048 bytes), far below a memory attack.
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
#: Longest request line plus headers the front reads (larger: 431).
MAX_HEAD_BYTES = 64 * 1024
#: Largest piece read or written at once, each way.
CHUNK_BYTES = 64 * 1024
#: Seconds a refused connection's remaining upload is read and dropped before the socket closes.
LINGER_S = 10.0
#: Seconds to connect to Triton's internal port.
CONNECT_TIMEOUT_S = 5.0

_REASONS = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 431:
            "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}


class _Refused(Exception):
    """A request the front answers itself (status, one-line message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _headers(head: bytes) -> Tuple[str, str, List[Tuple[str, str]]]:
    """The request or status line and the headers (names lower-cased) of a message head."""
    lines = head.decode("latin-1").split("\r\n")
    out = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Refused(400, f"malformed header line {line[:80]!r}")
        out.append((name.lower(), value.strip()))
    return lines[0], lines[0].split(" ", 2)[0], out


def _one(headers: List[Tuple[str, str]], name: str) -> Optional[str]:
    values = [v for k, v in headers if k == name]
    if len(values) > 1 and len(set(values)) > 1:
        raise _Refused(400, f"conflicting {name} headers")
    return values[0] if values else None


def _framing(headers: List[Tuple[str, str]]) -> Tuple[str, int]:
    """How a body is framed: ``("length", n)``, ``("chunked", 0)`` (or ``("none", 0)``)."""
    te = _one(headers, "transfer-encoding")
    cl = _one(headers, "content-length")
    if te is not None:
        if cl is not None:
            raise _Refused(400, "both Transfer-Encoding and Content-Length")
        if te.strip().lower() != "chunked":
            raise _Refused(501, f"Transfer-Encoding {te!r} (only chunked is accepted)")
        return "chunked", 0
    if cl is not None:
        if not cl.isdigit():
            raise _Refused(400, f"Content-Length {cl[:40]!r} is not a byte count")
        return "length", int(cl)
    return "none", 0


def _keep_alive(version: str, headers: List[Tuple[str, str]]) -> bool:
    conn = ",".join(v for k, v in headers if k == "connection").lower()
    if "close" in conn:
        return False
    return version == "HTTP/1.1" or "keep-alive" in conn


async def _copy_exact(reader: asyncio.StreamReader, writer: Optional[asyncio.StreamWriter], n: int) -> None:
    while n > 0:
        data = await reader.read(min(CHUNK_BYTES, n))
        if not data:
            raise ConnectionError("the peer closed the connection mid-body")
        n -= len(data)
        if writer is not None:
            writer.write(data)
            await writer.drain()


async def _copy_chunked(reader: asyncio.StreamReader, writer: Optional[asyncio.StreamWriter],
                        limit: Optional[int]) -> int:
    """Stream a chunked body as it is (sizes, extensions, trailers); raise 413 once its data pass ``limit``."""
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Refused(400, f"malformed chunk size {size_text[:20]!r}") from None
        total += size
        if limit is not None and total > limit:
            raise _Refused(413, f"more than {limit} bytes")
        if writer is not None:
            writer.write(line)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = await reader.readuntil(b"\r\n")
                if writer is not None:
                    writer.write(trailer)
                if trailer == b"\r\n":
                    break
            if writer is not None:
                await writer.drain()
            return total
        await _copy_exact(reader, writer, size)
        crlf = await reader.readexactly(2)
        if writer is not None:
            writer.write(crlf)
            await writer.drain()


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ANY = ("", "0.0.0.0", "::")


def _same_host(listen_host: str, upstream_host: str) -> bool:
    """Whether a front listening on ``listen_host`` would receive what it sends to ``upstream_host``."""
    return (listen_host == upstream_host or listen_host in _ANY
            or (listen_host in _LOOPBACK and upstream_host in _LOOPBACK))


def _set_front(front: Any, listen_host: str, listen_port: int, upstream_port: int, max_request_bytes: int,
               upstream_host: str) -> None:
    """The addresses and the checked size limit every front holds (HTTP and gRPC alike)."""
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise InvalidArgumentError("max_request_bytes", "an integer >= 1", max_request_bytes)
    if upstream_port == listen_port and _same_host(listen_host, upstream_host):
        raise InvalidArgumentError("upstream_port", f"a port other than the front's own ({listen_host}:{listen_port}: "
                                   "the front would forward every request to itself)", upstream_port)
    front.listen_host, front.listen_port = listen_host, listen_port
    front.upstream_host, front.upstream_port = upstream_host, upstream_port
    front.max_request_bytes = max_request_bytes


class RequestSizeFront:
    """A streaming HTTP/1.1 front that caps request bodies before Triton reads them.

    Args:
        listen_host (`str`): the public address (``cfgswitch serve --host``).
        listen_port (`int`): the public HTTP port (``--http-port``).
        upstream_port (`int`): Triton's HTTP port on ``127.0.0.1``.
        max_request_bytes (`int`): the largest request body accepted, in bytes (``--max-request-bytes``).
        upstream_host (`str`, defaults to ``"127.0.0.1"``): Triton's HTTP address.
    """

    def __init__(self, listen_host: str, listen_port: int, upstream_port: int, max_request_bytes: int,
                 upstream_host: str = "127.0.0.1") -> None:
        _set_front(self, listen_host, listen_port, upstream_port, max_request_bytes, upstream_host)
        self.refused = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._tasks: set = set()

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the public port and serve on a daemon thread (raises ``OSError`` if the port is taken)."""
        started = threading.Event()
        failure: List[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._client, self.listen_host, self.listen_port, limit=MAX_HEAD_BYTES, reuse_address=True))
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="cfgswitch-http-front", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        logger.info("HTTP front on %s:%d (bodies over %d bytes refused before they are read) -> Triton HTTP "
                    "on %s:%d", self.listen_host, self.listen_port, self.max_request_bytes, self.upstream_host,
                    self.upstream_port)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, close every connection and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=timeout_s)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(timeout_s + 1.0)

    # ----- one client connection ---------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        upstream: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    await self._refuse(reader, writer, _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes"))
                    return
                try:
                    line, method, headers = _headers(head)
                    version = line.rsplit(" ", 1)[-1]
                    kind, length = _framing(headers)
                    encoding = (_one(headers, "content-encoding") or "identity").strip().lower()
                    if encoding != "identity" and kind != "none":
                        raise _Refused(415, f"Content-Encoding {encoding!r}: compressed request bodies are refused "
                                       "(their decoded size cannot be capped before they are read)")
                    if kind == "length" and length > self.max_request_bytes:
                        raise _Refused(413, f"{length} bytes")
                except _Refused as refusal:
                    await self._refuse(reader, writer, refusal)
                    return
                keep = _keep_alive(version, headers)
                expect = (_one(headers, "expect") or "").lower() == "100-continue"
                if expect:  # answered here; Triton gets the request without it
                    head = b"\r\n".join(ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"expect:"))
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                # none yet, or Triton closed it
                if upstream is None or upstream[1].is_closing() or upstream[0].at_eof():
                    if upstream is not None:
                        upstream[1].close()
                        upstream = None
                    try:
                        upstream = await asyncio.wait_for(
                            asyncio.open_connection(self.upstream_host, self.upstream_port, limit=MAX_HEAD_BYTES),
                            CONNECT_TIMEOUT_S)
                    except (OSError, asyncio.TimeoutError) as e:
                        await self._refuse(reader, writer, _Refused(503, f"the server is not accepting requests ({e})"),
                                           body_pending=kind != "none")
                        return
                up_reader, up_writer = upstream
                up_writer.write(head)
                try:
                    if kind == "length":
                        await _copy_exact(reader, up_writer, length)
                    elif kind == "chunked":
                        await _copy_chunked(reader, up_writer, self.max_request_bytes)
                    else:
                        await up_writer.drain()
                except _Refused as refusal:
                    up_writer.close()  # Triton sees a cut request and drops it
                    upstream = None
                    await self._refuse(reader, writer, refusal)
                    return
                upstream_keep = await self._relay_response(up_reader, writer, method)
                if not upstream_keep:
                    up_writer.close()
                    upstream = None
                if not (keep and upstream_keep):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _Refused, OSError) as e:
            logger.debug("HTTP front: connection dropped: %s", e)
        except asyncio.CancelledError:
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()
            self._tasks.discard(task)

    async def _relay_response(self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              method: str) -> bool:
        """Stream one response (interim 1xx ones first) to the client; True if Triton keeps the connection."""
        while True:
            head = await up_reader.readuntil(b"\r\n\r\n")
            line, _, headers = _headers(head)
            parts = line.split(" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
            writer.write(head)
            if 100 <= status < 200:
                await writer.drain()
                continue
            break
        keep = _keep_alive(parts[0], headers)
        if method == "HEAD" or status in (204, 304):
            await writer.drain()
            return keep
        kind, length = _framing(headers)
        if kind == "length":
            await _copy_exact(up_reader, writer, length)
        elif kind == "chunked":
            await _copy_chunked(up_reader, writer, None)
        else:  # until Triton closes
            while True:
                data = await up_reader.read(CHUNK_BYTES)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            keep = False
        await writer.drain()
        return keep

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refusal: _Refused,
                      body_pending: bool = True) -> None:
        """Answer ``refusal`` as a KServe-v2 JSON error, then close (dropping what the client still sends)."""
        rid = new_request_id()
        if refusal.status == 413:
            message = str(InvalidArgumentError(
                "request", f"a body of at most {self.max_request_bytes} bytes (the server's --max-request-bytes)",
                str(refusal)))
            message = f"InvalidArgumentError: {message}"
        else:
            message = f"RequestError: {refusal}"
        message = f"{message} (request id {rid})"
        self.refused += 1
        logger.info("request %s refused: %s", rid, message.rsplit(" (request id", 1)[0])
        body = json.dumps({"error": message}).encode()
        writer.write(f"HTTP/1.1 {refusal.status} {_REASONS.get(refusal.status, 'Error')}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        try:
            await writer.drain()
            if body_pending and writer.can_write_eof():
                writer.write_eof()
                deadline = time.monotonic() + LINGER_S
                while time.monotonic() < deadline:  # read and drop: the client sees the 413, not a reset
                    data = await asyncio.wait_for(reader.read(CHUNK_BYTES), max(0.01, deadline - time.monotonic()))
                    if not data:
                        break
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass


#: Triton's gRPC methods that stream (every other one is unary): ``(requests stream, responses stream)``.
_GRPC_STREAMING = {"ModelStreamInfer": (True, True), "Watch": (False, True)}
#: Metadata a gRPC front does not forward (set by the transport for each hop).
_GRPC_HOP_METADATA = ("user-agent", "grpc-", ":")
#: Worker threads of the gRPC front: calls in flight at once (more wait in the front's queue).
GRPC_WORKERS = 64


class GrpcSizeFront:
    """A gRPC front for Triton's gRPC endpoint that refuses messages over a limit before they are read.

    gRPC's own receive limit (``grpc.max_receive_message_length``) is enforced by the transport as
    the message's length prefix arrives, so an oversized message is never buffered: the client gets
    ``RESOURCE_EXHAUSTED: Received message larger than max (N vs. LIMIT)``. Every other call is
    forwarded to Triton as bytes (no protobuf decoding), metadata and status both ways, on one
    shared channel; ``ModelStreamInfer`` streams both ways.

    Args:
        listen_host (`str`): the public address (``cfgswitch serve --host``).
        listen_port (`int`): the public gRPC port (``--grpc-port``).
        upstream_port (`int`): Triton's gRPC port on ``127.0.0.1``.
        max_request_bytes (`int`): the largest request message accepted, in bytes (``--max-request-bytes``).
        upstream_host (`str`, defaults to ``"127.0.0.1"``): Triton's gRPC address.
    """

    def __init__(self, listen_host: str, listen_port: int, upstream_port: int, max_request_bytes: int,
                 upstream_host: str = "127.0.0.1") -> None:
        _set_front(self, listen_host, listen_port, upstream_port, max_request_bytes, upstream_host)
        self._server: Any = None
        self._channel: Any = None
        self._callables: dict = {}

    def start(self) -> None:
        """Bind the public port and serve (raises ``OSError`` if the port cannot be bound)."""
        from concurrent import futures

        import grpc

        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.insecure_channel(f"{self.upstream_host}:{self.upstream_port}", options=unlimited)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="cfgswitch-grpc"),
                             handlers=[_GrpcPassthrough(self)],
                             options=[("grpc.max_receive_message_length", self.max_request_bytes),
                                      ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        try:
            bound = server.add_insecure_port(f"{self.listen_host}:{self.listen_port}")
        except RuntimeError as e:
            bound, error = 0, e
        else:
            error = None
        if not bound:
            self._channel.close()
            raise OSError(f"cannot listen on {self.listen_host}:{self.listen_port} for gRPC ({error or 'in use'})")
        server.start()
        self._server = server
        logger.info("gRPC front on %s:%d (messages over %d bytes refused before they are read) -> Triton gRPC on %s:%d",
                    self.listen_host, self.listen_port, self.max_request_bytes, self.upstream_host, self.upstream_port)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop listening; calls still running get ``grace_s`` to finish."""
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1.0)
            self._server = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _callable(self, method: str, streams: Tuple[bool, bool]) -> Any:
        key = (method, streams)
        if key not in self._callables:
            make = {(False, False): self._channel.unary_unary, (True, True): self._channel.stream_stream,
                    (False, True): self._channel.unary_stream, (True, False): self._channel.stream_unary}[streams]
            self._callables[key] = make(method)  # bytes in, bytes out
        return self._callables[key]


def _timeout(context: Any) -> Optional[float]:
    """The client's deadline as the upstream call's timeout (``None``: no deadline, which grpcio reports as huge)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


def _forwarded(context: Any) -> List[Tuple[str, Any]]:
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if not k.startswith(_GRPC_HOP_METADATA)]


class _GrpcPassthrough:
    """A ``grpc.GenericRpcHandler`` that forwards every method to Triton unchanged."""

    def __init__(self, front: GrpcSizeFront) -> None:
        self.front = front

    def service(self, details: Any) -> Any:
        import grpc

        method = details.method
        streams = _GRPC_STREAMING.get(method.rsplit("/", 1)[-1], (False, False))
        upstream = self.front._callable(method, streams)

        def relay_error(e: "grpc.RpcError", context: Any) -> None:
            if hasattr(e, "trailing_metadata") and e.trailing_metadata():
                context.set_trailing_metadata(e.trailing_metadata())
            context.abort(e.code(), e.details() or "")

        if not streams[1]:
            def unary(request: Any, context: Any) -> bytes:
                future = upstream.future(request, metadata=_forwarded(context), timeout=_timeout(context))
                context.add_callback(future.cancel)
                try:
                    response = future.result()
                except grpc.RpcError as e:
                    relay_error(e, context)
                if future.trailing_metadata():
                    context.set_trailing_metadata(future.trailing_metadata())
                return response

            if streams[0]:
                return grpc.stream_unary_rpc_method_handler(unary)
            return grpc.unary_unary_rpc_method_handler(unary)

        def streaming(request: Any, context: Any) -> Any:
            call = upstream(request, metadata=_forwarded(context), timeout=_timeout(context))
            context.add_callback(call.cancel)
            try:
                for response in call:
                    yield response
            except grpc.RpcError as e:
                relay_error(e, context)

        if streams[0]:
            return grpc.stream_stream_rpc_method_handler(streaming)
        return grpc.unary_stream_rpc_method_handler(streaming)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for Triton's internal HTTP endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["CHUNK_BYTES", "DEFAULT_MAX_REQUEST_BYTES", "GRPC_WORKERS", "GrpcSizeFront", "LINGER_S", "MAX_HEAD_BYTES",
           "RequestSizeFront", "free_port"]
