"""The hop's client for whole answers (hop/lean_client.py), against raw sockets that misbehave the
way a dying or restarting pool replica does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from trex_serve.hop import contract as hop
from trex_serve.hop.lean_client import LeanClient
from trex_serve.hop.relay import HttpRelay

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> int:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        body = await read_request(reader)
        writer.write(answer(b'{"echo":' + body + b"}", extra="X-Trex-Usage: 1,2,0\r\n"))
        await writer.drain()


async def test_sequential_answers_share_one_kept_alive_connection() -> None:
    server = RawServer(echo_forever)
    client = LeanClient()
    async with server as port:
        for i in range(5):
            status, headers, body = await client.post("127.0.0.1", port, "/relay", {"X-A": "b"}, str(i).encode())
            assert (status, body) == (200, b'{"echo":' + str(i).encode() + b"}")
            assert headers["x-trex-usage"] == "1,2,0"
        await client.close()
    assert server.connections == 1


async def test_a_connection_the_replica_closed_while_idle_is_replaced_without_an_error() -> None:
    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}"))  # no "Connection: close": the client keeps it, then finds it closed
        await writer.drain()

    server = RawServer(one_answer_then_close)
    client = LeanClient()
    async with server as port:
        for _ in range(3):
            await asyncio.sleep(0.05)  # the close reaches the client before its next request
            assert (await client.post("127.0.0.1", port, "/relay", {}, b"{}"))[0] == 200
        await client.close()
    assert server.connections == 3


async def test_connections_left_over_from_a_burst_are_forgotten_once_the_replica_closes_them() -> None:
    async def close_when_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = await asyncio.wait_for(read_request(reader), 0.1)
            except TimeoutError:
                return  # idle too long: the replica closes it, as aiohttp's keep-alive timeout does
            writer.write(answer(body))
            await writer.drain()

    server = RawServer(close_when_idle)
    client = LeanClient()
    async with server as port:
        await asyncio.gather(*(client.post("127.0.0.1", port, "/relay", {}, b"{}") for _ in range(5)))
        assert len(client._idle[("127.0.0.1", port)]) == 5
        for _ in range(6):  # one connection kept busy; the other four go quiet and are closed
            await asyncio.sleep(0.05)
            assert (await client.post("127.0.0.1", port, "/relay", {}, b"{}"))[0] == 200
        assert len(client._idle[("127.0.0.1", port)]) == 1
        await client.close()


async def test_an_answer_cut_part_way_is_a_reset_and_the_connection_is_not_reused() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\"")
        await writer.drain()

    async def pick(provider: str, exclude: set) -> tuple[str, int]:
        return ("127.0.0.1", port)

    async with RawServer(cut) as port:
        relay = HttpRelay(pick, "s")
        resp = await relay(hop.HopRequest("r1", "p", "m", "chat", False, False, b"{}"))
        await relay.close()
    assert (resp.status, resp.failure, resp.retryable) == (502, "reset", True)


async def test_a_replica_that_refuses_connections_is_unreachable_not_a_failed_answer() -> None:
    async with RawServer(echo_forever) as port:
        pass  # closed: nothing listens on the port any more

    async def pick(provider: str, exclude: set) -> tuple[str, int]:
        return ("127.0.0.1", port)

    relay = HttpRelay(pick, "s", replica_tries=2)
    with pytest.raises(hop.ReplicaUnreachable):
        await relay(hop.HopRequest("r1", "p", "m", "chat", False, False, b"{}"))
    await relay.close()


async def test_a_request_abandoned_at_its_deadline_leaves_no_connection_for_the_next() -> None:
    seen: list[bytes] = []

    async def slow_then_fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await read_request(reader)
            seen.append(body)
            if body == b"slow":
                await asyncio.sleep(0.5)
            writer.write(answer(body))
            await writer.drain()

    server = RawServer(slow_then_fast)
    client = LeanClient()
    async with server as port:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.post("127.0.0.1", port, "/relay", {}, b"slow")
        # The late answer to "slow" must never be read as the answer to the next request.
        assert (await client.post("127.0.0.1", port, "/relay", {}, b"fast"))[2] == b"fast"
        await client.close()
    assert server.connections == 2


async def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    server = RawServer(echo_forever)
    async with server as port:
        with pytest.raises(ValueError):
            await LeanClient().post("127.0.0.1", port, "/relay", {"X-Model": "a\r\nX-Evil: 1"}, b"{}")
    assert server.connections == 0
