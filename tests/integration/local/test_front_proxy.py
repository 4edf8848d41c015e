"""The front proxy `trex-serve up` runs (a real HAProxy): every request gets an id signed for the
ingress, a client cannot choose that id, and an answer that did not come from an ingress replica
(Serve's bare 500, a cut connection, nothing listening) still reaches the client as the OpenAI
envelope."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import httpx
import pytest

from trex_serve.local.embedded import free_port, port_open
from trex_serve.local.front_proxy import front_proxy_config, front_threads, haproxy_binary
from trex_serve.web.front_id import AUTH_HEADER, ID_HEADER, trusted_request_id

SECRET = "f" * 64


class Backend:
    """Stands in for Serve's HAProxy: answers by path the ways a lost replica shows up there."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: list[dict[str, str]] = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        path = lines[0].split()[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        self.seen.append(headers)
        if int(headers.get("content-length", "0")):
            await reader.readexactly(int(headers["content-length"]))
        if path == "/bare500":
            body = b"Internal Server Error"
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        elif path == "/ours500":
            body = b'{"error": {"code": "internal_error"}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                         b"X-Trex-Request-Id: req_x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif path == "/v1/chat/completions" and sum(h.get(ID_HEADER.lower()) == headers.get(ID_HEADER.lower())
                                                    for h in self.seen) > 1:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Trex-Request-Id: x\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/ok":  # announcing its stack, as aiohttp and uvicorn do by default
            writer.write(b"HTTP/1.1 200 OK\r\nServer: Python/3.11 aiohttp/3.14.5\r\nContent-Length: 2\r\n\r\nok")
        # anything else (and the first try of a chat request): close without a byte of answer
        await writer.drain()
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("no HAProxy binary")
    backend = Backend()
    public = free_port()
    cfg = tmp_path_factory.mktemp("front") / "front.cfg"
    cfg.write_text(front_proxy_config(public, backend.port, SECRET))
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", public):
        assert proc.poll() is None and time.monotonic() < deadline, "the front proxy did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{public}", "backend": backend, "cfg": cfg, "binary": binary}
    proc.kill()
    proc.wait(10)
    backend.stop()


def assert_envelope(resp: httpx.Response, status: int = 502) -> dict:
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["retry-after"] == "1"
    err = resp.json()["error"]
    assert err["code"] == "gateway_unavailable" and err["type"] == "server_error"
    assert err["trex"]["request_id"] == resp.headers["x-trex-request-id"]
    assert err["trex"]["request_id"].startswith("req_")
    return err


def test_front_proxy_signs_its_own_request_id_and_drops_the_clients(front):
    backend: Backend = front["backend"]
    resp = httpx.post(f"{front['url']}/ok", content=b"{}",
                      headers={ID_HEADER: "req_" + "a" * 32, AUTH_HEADER: "guess"})
    assert resp.status_code == 200
    seen = backend.seen[-1]
    assert seen[ID_HEADER.lower()] != "req_" + "a" * 32
    assert seen[AUTH_HEADER.lower()] == SECRET
    assert trusted_request_id(seen, SECRET) == seen[ID_HEADER.lower()]
    httpx.get(f"{front['url']}/ok")
    assert backend.seen[-1][ID_HEADER.lower()] != seen[ID_HEADER.lower()], "each request gets its own id"


def test_front_proxy_does_not_announce_the_stack_behind_it(front):
    resp = httpx.get(f"{front['url']}/ok")
    assert resp.status_code == 200 and "server" not in resp.headers, resp.headers


def test_ingress_believes_a_request_id_only_with_the_front_secret():
    rid = "req_" + "0123456789abcdef" * 2
    assert trusted_request_id({ID_HEADER.lower(): rid, AUTH_HEADER.lower(): SECRET}, SECRET) == rid
    assert trusted_request_id({ID_HEADER.lower(): rid, AUTH_HEADER.lower(): "nope"}, SECRET) is None
    assert trusted_request_id({ID_HEADER.lower(): rid}, SECRET) is None
    assert trusted_request_id({ID_HEADER.lower(): rid, AUTH_HEADER.lower(): ""}, "") is None
    assert trusted_request_id({ID_HEADER.lower(): "req_../x", AUTH_HEADER.lower(): SECRET}, SECRET) is None


def test_servers_bare_500_becomes_the_openai_envelope(front):
    assert_envelope(httpx.post(f"{front['url']}/bare500", json={"model": "m"}))


def test_connection_cut_before_any_answer_becomes_the_openai_envelope(front):
    assert_envelope(httpx.post(f"{front['url']}/cut", json={"model": "m"}))


def test_an_ingress_error_passes_through_untouched(front):
    resp = httpx.post(f"{front['url']}/ours500", json={})
    assert resp.status_code == 500 and resp.json() == {"error": {"code": "internal_error"}}


def test_nothing_listening_behind_the_front_is_the_openai_envelope(front, tmp_path):
    public = free_port()
    cfg = tmp_path / "front.cfg"
    cfg.write_text(front_proxy_config(public, free_port(), SECRET))
    proc = subprocess.Popen([front["binary"], "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", public):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # HAProxy's own "no server" answer (503, after its connect retries) in the envelope too.
        err = assert_envelope(httpx.post(f"http://127.0.0.1:{public}/v1/chat/completions", json={}, timeout=30),
                              503)
        assert "not reachable" in err["message"]
    finally:
        proc.kill()
        proc.wait(10)


def test_a_chat_request_cut_before_any_answer_is_replayed_with_the_same_id(front):
    backend: Backend = front["backend"]
    before = len(backend.seen)
    resp = httpx.post(f"{front['url']}/v1/chat/completions", json={"model": "m"})
    tries = backend.seen[before:]
    assert resp.status_code == 200 and resp.text == "ok", (resp.status_code, [t.get(ID_HEADER.lower()) for t in tries])
    assert len(tries) == 2 and tries[0][ID_HEADER.lower()] == tries[1][ID_HEADER.lower()]


def test_an_operator_request_is_never_sent_twice(front):
    backend: Backend = front["backend"]
    before = len(backend.seen)
    assert_envelope(httpx.post(f"{front['url']}/admin/v1/accounts/a/credits", json={"amount": 5}))
    assert len(backend.seen) == before + 1


def test_the_front_proxy_takes_one_thread_per_eight_cores():
    assert [front_threads(n) for n in (1, 2, 7, 8, 16, 64)] == [1, 1, 1, 1, 2, 8]
    assert f"nbthread {front_threads()}\n" in front_proxy_config(8000, 8001, SECRET)
