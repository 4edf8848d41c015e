"""The lean HTTP/1.1 server (hop/lean_server.py) over real sockets: keep-alive, pipelining, chunked
streams, the body limit, malformed requests, a client leaving mid-stream, a graceful stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httptools
import pytest

from trex_serve.hop.lean_messages import Request, Response, StreamResponse
from trex_serve.hop.lean_server import LeanServer


class _Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def read_answer(reader: asyncio.StreamReader) -> _Answer:
    """One answer off a connection (the tests send the next request only after it)."""
    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    while not answer.done:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "connection closed before the answer was whole"
        parser.feed_data(data)
    answer.status = parser.get_status_code()
    return answer


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.gate: asyncio.Event | None = None
        self.write_error: BaseException | None = None
        self.finished = asyncio.Event()
        self.written = 0

    async def handle(self, request: Request) -> Response | StreamResponse:
        self.seen.append(f"{request.method} {request.path}")
        if request.oversize:
            return Response(413, b"too large")
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/wait":
            assert self.gate is not None
            await self.gate.wait()
        if request.path == "/stream":
            response = StreamResponse(200, {"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(f"data: {i}\n\n".encode())
            await response.write_eof()
            return response
        if request.path == "/endless":
            response = StreamResponse(200, {"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                while self.written < 64 * 1024 * 1024:
                    await response.write(b"x" * 65536)
                    self.written += 65536
                await response.write_eof()
            except ConnectionError as exc:
                self.write_error = exc
            finally:
                self.finished.set()
            return response
        body = f"{request.method} {request.path}?{request.query_string} {len(request.body)}".encode()
        return Response(200, body, {"X-Peer": request.peer or "-"}, content_type="text/plain")


@pytest.fixture
async def served() -> AsyncIterator[tuple[LeanServer, Recorder]]:
    recorder = Recorder()
    server = LeanServer(recorder.handle, max_body=1024)
    await server.start("127.0.0.1")
    yield server, recorder
    await server.stop(timeout=1)


async def _connect(server: LeanServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def test_one_connection_serves_several_requests_in_turn(served):
    server, _ = served
    reader, writer = await _connect(server)
    for i in range(3):
        writer.write(f"POST /echo?i={i} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.body == f"POST /echo?i={i} 5".encode()
        assert answer.headers["content-length"] == str(len(answer.body))
        assert "server" not in answer.headers and "connection" not in answer.headers
        assert answer.headers["x-peer"] == "127.0.0.1"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(served):
    server, recorder = served
    reader, writer = await _connect(server)
    # The first is the slowest: its answer must still come first.
    writer.write(_get("/slow") + _get("/a") + _get("/b", "Connection: close\r\n"))
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes after the third
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b"GET /slow?") < data.index(b"GET /a?") < data.index(b"GET /b?")
    assert recorder.seen == ["GET /slow", "GET /a", "GET /b"]
    assert data.count(b"Connection: close") == 1


async def test_a_stream_goes_out_in_chunks_and_the_connection_stays_open(served):
    server, _ = served
    reader, writer = await _connect(server)
    writer.write(_get("/stream"))
    answer = await read_answer(reader)
    assert answer.headers["transfer-encoding"] == "chunked" and "content-length" not in answer.headers
    assert answer.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.write(_get("/after"))
    answer = await read_answer(reader)
    assert answer.body.startswith(b"GET /after")
    writer.close()


@pytest.mark.parametrize("declared", [True, False])
async def test_a_body_over_the_limit_is_refused_and_the_connection_closed(served, declared):
    server, recorder = served
    reader, writer = await _connect(server)
    if declared:
        writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000)
    else:
        chunk = b"x" * 600
        writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + (b"%x\r\n%b\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")
    answer = await read_answer(reader)
    assert answer.status == 413 and answer.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert recorder.seen == ["POST /big"]


async def test_a_malformed_request_gets_400_and_a_closed_connection(served):
    server, recorder = served
    reader, writer = await _connect(server)
    writer.write(_get("/fine") + b"NOT HTTP AT ALL\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 400 Bad Request" in data
    assert recorder.seen == ["GET /fine"]


async def test_a_handler_that_fails_answers_500_and_closes(served):
    server, _ = served
    reader, writer = await _connect(server)
    writer.write(_get("/boom"))
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error") and b"Connection: close" in data


async def test_a_client_leaving_mid_stream_makes_the_write_raise(served):
    server, recorder = served
    reader, writer = await _connect(server)
    writer.write(_get("/endless"))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.transport.abort()  # gone without reading the rest: the server's writes back up
    await asyncio.wait_for(recorder.finished.wait(), 5)
    assert isinstance(recorder.write_error, ConnectionResetError)
    for _ in range(50):
        if not server.conns:
            break
        await asyncio.sleep(0.02)
    assert not server.conns
    assert all(c.task is None for c in server.conns), "no task left behind"


async def test_stop_lets_the_request_in_flight_finish_and_refuses_new_connections(served):
    server, recorder = served
    recorder.gate = asyncio.Event()
    idle_reader, idle_writer = await _connect(server)
    idle_writer.write(_get("/x"))
    await read_answer(idle_reader)
    reader, writer = await _connect(server)
    writer.write(_get("/wait"))
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(server.stop(timeout=5))
    await asyncio.sleep(0.05)
    assert await asyncio.wait_for(idle_reader.read(), 5) == b"", "an idle connection is closed at once"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)
    assert not stopping.done()
    recorder.gate.set()
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
    await asyncio.wait_for(stopping, 5)


async def test_a_stream_waits_for_a_client_that_does_not_read(served):
    server, recorder = served
    reader, writer = await _connect(server)
    writer.write(_get("/endless"))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.sleep(0.3)
    held = recorder.written
    await asyncio.sleep(0.2)
    # Paused: what was written waits in the socket buffers and the transport's, the writer waits too.
    assert recorder.written == held < 16 * 1024 * 1024
    size = 0
    while not recorder.finished.is_set() or size < recorder.written:
        size += len(await asyncio.wait_for(reader.read(1 << 20), 5))
    assert recorder.written == 64 * 1024 * 1024 and recorder.write_error is None
    writer.close()


async def test_http_1_0_gets_a_stream_ended_by_the_close_and_no_keep_alive(served):
    server, _ = served
    reader, writer = await _connect(server)
    writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_a_client_that_shuts_its_side_after_its_request_still_gets_the_answer(served):
    server, _ = served
    reader, writer = await _connect(server)
    writer.write(_get("/slow"))
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"GET /slow? 0")


async def test_a_head_too_large_is_refused(served):
    server, recorder = served
    reader, writer = await _connect(server)
    writer.write(_get("/x", "X-Big: " + "a" * 70000 + "\r\n"))
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 431 ") and recorder.seen == []


async def test_expect_100_continue_is_answered_before_the_body(served):
    server, _ = served
    reader, writer = await _connect(server)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.body == b"POST /up? 3"
    writer.close()


async def test_a_head_request_gets_the_head_alone_and_the_connection_stays_in_step(served):
    """A body after a HEAD's answer would be read by the client as the start of the next answer."""
    server, _ = served
    reader, writer = await _connect(server)
    writer.write(b"HEAD /page HTTP/1.1\r\nHost: x\r\n\r\n" + _get("/next", "Connection: close\r\n"))
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes after the second
    head, _, rest = data.partition(b"\r\n\r\n")
    # The length the body would have (b"HEAD /page? 0"), as for a GET; no body follows.
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 13\r\n" in head
    assert rest.startswith(b"HTTP/1.1 200 OK"), rest[:80]
    assert rest.endswith(b"GET /next? 0")
