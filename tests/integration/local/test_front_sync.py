"""The front proxy's direct data path (a real HAProxy under local/front_sync.py, real Redis): the hot
routes go to the data servers the ingress replicas announce, everything else and every hot route
without a live data server to Serve's port; an announced server that dies with a request on it
loses nothing (the request is replayed elsewhere with the same id)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis as redis_sync
from aiohttp import web

from trex_serve.local.embedded import free_port, port_open
from trex_serve.local.front_proxy import admin_socket_path, front_proxy_config, haproxy_binary
from trex_serve.local.front_sync import Slots
from trex_serve.web.data_endpoints import Announcer, live_endpoints, registry_key
from trex_serve.web.data_server import HEALTH_PATH
from trex_serve.web.front_id import AUTH_HEADER, ID_HEADER

SECRET = "e" * 64


class Stand:
    """A small HTTP server in its own thread that says who answered: stands in for Serve's port or
    for one ingress replica's data server. ``cut_chat`` closes chat requests without an answer, as a
    replica killed mid-request does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.seen: list[dict[str, str]] = []
        self.cut_chat = False
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.runner = web.ServerRunner(web.Server(self._handle))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == HEALTH_PATH:
            return web.Response(text="ok")
        await request.read()
        self.seen.append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()}})
        if self.cut_chat and request.path == "/v1/chat/completions":
            request.transport.close()
            raise asyncio.CancelledError
        return web.json_response({"by": self.name}, headers={"X-Trex-Request-Id": "req_x"})

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def by(url: str, path: str = "/v1/chat/completions", method: str = "POST") -> str:
    resp = httpx.request(method, f"{url}{path}", json={"model": "m"}, timeout=15,
                         headers={"X-Forwarded-For": "198.51.100.9"})
    assert resp.status_code == 200, resp.text
    return resp.json()["by"]


@pytest.fixture
def front(tmp_path, redis_url):
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary")
    client = redis_sync.Redis.from_url(redis_url)
    client.delete(registry_key())
    serve = Stand("serve")
    public = free_port()
    socket_path = admin_socket_path(tmp_path)
    cfg = tmp_path / "front.cfg"
    cfg.write_text(front_proxy_config(public, serve.port, SECRET, admin_socket=socket_path))
    proc = subprocess.Popen([sys.executable, "-m", "trex_serve.local.front_sync", "--cfg", str(cfg),
                             "--socket", socket_path, "--redis-url", redis_url])
    wait_for(lambda: port_open("127.0.0.1", public))
    yield {"url": f"http://127.0.0.1:{public}", "serve": serve, "redis": client}
    proc.terminate()
    proc.wait(15)
    serve.stop()
    client.delete(registry_key())


def announce(client, stand: Stand) -> None:
    client.zadd(registry_key(), {f"127.0.0.1:{stand.port}": time.time() + 60})


def test_hot_routes_go_to_announced_data_servers_and_back_to_serve_when_withdrawn(front):
    url, client = front["url"], front["redis"]
    assert by(url) == "serve", "no data server announced yet: Serve's port answers"
    data = Stand("data")
    try:
        announce(client, data)
        wait_for(lambda: by(url) == "data")
        seen = data.seen[-1]
        assert seen["x-forwarded-for"] == "127.0.0.1", "the client's own X-Forwarded-For is dropped"
        assert seen[AUTH_HEADER.lower()] == SECRET and seen[ID_HEADER.lower()].startswith("req_")
        assert by(url, "/v1/responses") == "data"
        assert by(url, "/v1/models", "GET") == "data"
        assert by(url, "/v1/models/gpt-4o-mini", "GET") == "data"
        # The control surface and every other route stay on Serve's port.
        assert by(url, "/admin/v1/accounts") == "serve"
        assert by(url, "/v1/chat/completions", "GET") == "serve"
        client.zrem(registry_key(), f"127.0.0.1:{data.port}")
        wait_for(lambda: by(url) == "serve")
    finally:
        data.stop()


def test_expired_announcement_falls_out(front):
    url, client = front["url"], front["redis"]
    data = Stand("data")
    try:
        client.zadd(registry_key(), {f"127.0.0.1:{data.port}": time.time() + 2})
        wait_for(lambda: by(url) == "data")
        wait_for(lambda: by(url) == "serve", timeout=6)
    finally:
        data.stop()


def test_a_data_server_lost_mid_request_is_replayed_on_another_with_the_same_id(front):
    url, client = front["url"], front["redis"]
    first, second = Stand("first"), Stand("second")
    try:
        announce(client, first)
        wait_for(lambda: by(url) == "first")
        announce(client, second)
        wait_for(lambda: "second" in {by(url) for _ in range(4)})  # both in rotation
        first.cut_chat = True
        before = len(first.seen)
        answered = {by(url) for _ in range(6)}
        assert answered == {"second"}, answered
        cut = first.seen[before:]
        assert cut, "some request reached the dying server"
        ids = {s[ID_HEADER.lower()] for s in second.seen}
        assert any(c[ID_HEADER.lower()] in ids for c in cut), "the replay carries the same request id"
    finally:
        first.stop()
        second.stop()


def test_slots_turn_live_sets_into_runtime_commands():
    slots = Slots(2)
    assert slots.commands(["10.0.0.1:5000"]) == ["set server data/d1 addr 10.0.0.1 port 5000",
                                                  "set server data/d1 state ready"]
    assert slots.commands(["10.0.0.1:5000"]) == []
    assert slots.commands(["10.0.0.2:5001", "[::1]:5002", "10.0.0.3:1"]) == [
        "set server data/d1 state maint",
        "set server data/d1 addr 10.0.0.2 port 5001", "set server data/d1 state ready",
        "set server data/d2 addr ::1 port 5002", "set server data/d2 state ready"]


async def test_announcer_renews_and_withdraws(redis_url, key_prefix):
    from redis import asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    sync = redis_sync.Redis.from_url(redis_url)
    announcer = Announcer(client, "10.1.2.3:4567", key_prefix)
    announcer.start()
    try:
        await asyncio.sleep(0.2)
        assert live_endpoints(sync, key_prefix) == ["10.1.2.3:4567"]
        await announcer.withdraw()
        assert live_endpoints(sync, key_prefix) == []
    finally:
        await client.aclose()
