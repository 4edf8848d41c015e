"""A pool replica's whole upstream answers over its lean client (hop/upstream_client.py): a real
PoolServer asked over the hop, against a raw upstream socket that answers each way HTTP allows
(lengths, chunks, the close) and fails each way an upstream does."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.hop.test_lean_client import RawServer, answer
from trex_serve.catalog import Provider
from trex_serve.hop import contract as hop
from trex_serve.hop import pool_server
from trex_serve.hop.lean_client import LeanClient
from trex_serve.hop.pool_server import PoolServer
from trex_serve.hop.upstream_client import UpstreamClient, parse_target

COMPLETION = b'{"id":"c1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


@asynccontextmanager
async def pool_for(base_url: str, **timeouts: float) -> AsyncIterator[tuple[PoolServer, LeanClient, int]]:
    provider = Provider(name="up", base_url=base_url, auth="none", **{
        "timeout_s": 1.0, "first_byte_timeout_s": 0.5, "connect_timeout_s": 0.5, **timeouts})
    outcomes: list[hop.Outcome] = []
    pool = PoolServer({"up": provider}, "s3cret", outcomes.append)
    pool.outcomes = outcomes  # type: ignore[attr-defined]
    port = await pool.start()
    client = LeanClient()
    try:
        yield pool, client, port
    finally:
        await client.close()
        await pool.stop()


async def ask(client: LeanClient, port: int) -> tuple[int, dict[str, str], bytes]:
    headers = {hop.H_SECRET: "s3cret", hop.H_PROVIDER: "up", hop.H_MODEL: "m", hop.H_API: "chat",
               hop.H_STREAM: "0", "Content-Type": "application/json"}
    status, answer_headers, body = await client.post("127.0.0.1", port, "/relay", headers, BODY)
    return status, dict(answer_headers), body


async def test_answers_reuse_one_connection_and_send_only_the_adapters_headers() -> None:
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_head(reader)
            heads.append(head)
            writer.write(answer(COMPLETION, extra="Set-Cookie: a=b\r\n"))

    server = RawServer(upstream)
    async with server as up, pool_for(f"http://127.0.0.1:{up}/v1") as (pool, client, port):
        for _ in range(3):
            status, headers, body = await ask(client, port)
            assert (status, body) == (200, COMPLETION)
            assert headers[hop.H_USAGE].startswith("3,4")
    assert server.connections == 1
    lines = heads[0].split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    names = sorted(line.split(b":")[0].lower() for line in lines[1:] if line)
    assert names == [b"content-length", b"content-type", b"host"]  # no User-Agent, Accept, cookie
    assert f"Host: 127.0.0.1:{up}".encode() in lines


async def test_chunked_and_close_delimited_answers() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        half = len(COMPLETION) // 2
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (half, COMPLETION[:half]))
        await asyncio.sleep(0.02)
        rest = COMPLETION[half:]
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        await read_head(reader)  # the same connection again: HTTP/1.0 style, ended by the close
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + COMPLETION[:10])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(COMPLETION[10:])

    server = RawServer(upstream)
    async with server as up, pool_for(f"http://127.0.0.1:{up}/v1") as (pool, client, port):
        assert (await ask(client, port))[::2] == (200, COMPLETION)
        assert (await ask(client, port))[::2] == (200, COMPLETION)
        assert pool.lean is not None and not any(pool.lean._idle.values())  # closed: not kept
    assert server.connections == 1


@pytest.mark.parametrize(("behaviour", "status", "failure"), [
    ("refused", 502, "connect"),
    ("silent", 504, "first_byte_timeout"),
    ("slow_body", 504, "timeout"),
    ("cut", 502, "reset"),
    ("oversize", 502, "bad_response"),
])
async def test_failures_are_the_pools_answers(behaviour: str, status: int, failure: str, monkeypatch) -> None:
    monkeypatch.setattr(pool_server, "MAX_RESPONSE_BYTES", 64 * 1024)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        if behaviour == "silent":
            await asyncio.sleep(5)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(COMPLETION) + 200_000}\r\n\r\n".encode()
        writer.write(head + COMPLETION[:5])
        if behaviour == "slow_body":
            await asyncio.sleep(5)
        elif behaviour == "oversize":
            writer.write(b" " * 200_000)
            await asyncio.sleep(5)

    server = RawServer(upstream)
    async with server as up:
        if behaviour == "refused":
            server.server.close()  # type: ignore[union-attr]
            await server.server.wait_closed()  # type: ignore[union-attr]
        async with pool_for(f"http://127.0.0.1:{up}/v1") as (pool, client, port):
            got, headers, _ = await ask(client, port)
            assert (got, headers[hop.H_FAILURE]) == (status, failure)
            assert pool.outcomes[-1].status == status  # type: ignore[attr-defined]


async def test_connect_timeout_is_a_connect_failure() -> None:
    # 192.0.2.0/24 is TEST-NET-1: nothing answers, so only the connect timeout ends the wait.
    async with pool_for("http://192.0.2.1:81/v1", connect_timeout_s=0.2, first_byte_timeout_s=2) as (_, client, port):
        got, headers, _ = await ask(client, port)
    assert (got, headers[hop.H_FAILURE]) == (502, "connect")


async def test_a_429_passes_its_retry_after_on() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(answer(b'{"error":{"message":"slow down","type":"rate_limit"}}', "429 Too Many Requests",
                                "Retry-After: 7\r\n"))

    server = RawServer(upstream)
    async with server as up, pool_for(f"http://127.0.0.1:{up}/v1") as (pool, client, port):
        for _ in range(2):
            got, headers, body = await ask(client, port)
            assert (got, headers["Retry-After"]) == (429, "7")
            assert b"slow down" in body
        assert pool.outcomes[-1].retry_after == 7.0  # type: ignore[attr-defined]
    assert server.connections == 1  # an error answer read whole leaves its connection reusable


async def test_max_connections_bounds_the_connections_in_use() -> None:
    busy = 0
    peak = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy, peak
        while True:
            await read_head(reader)
            busy += 1
            peak = max(peak, busy)
            await asyncio.sleep(0.02)
            busy -= 1
            writer.write(answer(COMPLETION))

    server = RawServer(upstream)
    async with server as up, pool_for(f"http://127.0.0.1:{up}/v1") as (pool, client, port):
        assert pool.lean is not None
        pool.lean = UpstreamClient(max_connections=2)
        results = await asyncio.gather(*(ask(client, port) for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert peak <= 2 and server.connections <= 2


def self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client = ssl.create_default_context(cafile=str(tmp / "cert.pem"))
    return server, client


async def test_https_upstream(tmp_path: Path) -> None:
    server_ctx, client_ctx = self_signed(tmp_path)
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await read_head(reader)
                writer.write(answer(COMPLETION))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()  # the pool's client closed its idle connection

    tls = await asyncio.start_server(upstream, "127.0.0.1", 0, ssl=server_ctx)
    up = tls.sockets[0].getsockname()[1]
    try:
        async with pool_for(f"https://localhost:{up}/v1") as (pool, client, port):
            # The default context does not trust this certificate: a refused handshake is a connect failure.
            got, headers, _ = await ask(client, port)
            assert (got, headers[hop.H_FAILURE]) == (502, "connect")
            pool.lean = UpstreamClient(ssl_context=client_ctx)
            for _ in range(2):
                assert (await ask(client, port))[::2] == (200, COMPLETION)
            await pool.lean.close()
    finally:
        tls.close()
    assert connections == 1  # one kept-alive TLS connection (the refused handshake never got here)


def test_urls_it_leaves_to_aiohttp(monkeypatch) -> None:
    assert parse_target("https://api.example.com/v1/chat?api-version=1").host == "api.example.com"  # type: ignore[union-attr]
    assert parse_target("http://[::1]:8080/v1").host == "[::1]:8080"  # type: ignore[union-attr]
    assert parse_target("https://api.example.com:443/v1").endpoint == ("https", "api.example.com", 443)  # type: ignore[union-attr]
    for url in ("https://user:pw@api.example.com/v1", "ftp://api.example.com/v1", "https://bücher.example/v1",
                "https://api.example.com/v 1", "https://api.example.com:99999/v1"):
        assert parse_target(url) is None, url


async def test_a_proxy_in_the_environment_leaves_every_call_to_aiohttp(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    pool = PoolServer({}, "s3cret")
    await pool.start()
    try:
        assert pool.lean is None
    finally:
        await pool.stop()
