"""The ingress's local view of a pool's replicas (deployments/pool_view.py) with the real relay, real
pool servers and a mock upstream: in-flight counts come back to zero for whole and streamed answers,
a refused endpoint is left out, the less busy of two replicas is chosen, and an unknown pool falls
back to Serve's own choice."""

from __future__ import annotations

import orjson
import pytest

from deployments.pool_view import PoolView, running_endpoints
from tests.helpers import write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.hop import contract as hop
from trex_serve.hop.pool_server import PoolServer
from trex_serve.hop.relay import HttpRelay
from trex_serve.local.embedded import free_port

SECRET = "view-secret"


@pytest.fixture
async def pools(mocks, tmp_path):
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks))
    servers = [PoolServer({"alpha": catalog.provider("alpha")}, SECRET, lambda _o: None) for _ in range(2)]
    ports = [await s.start("127.0.0.1", 0) for s in servers]
    yield [("127.0.0.1", p) for p in ports]
    for s in servers:
        await s.stop()


class NoRouterHandle:
    """A handle whose router was never used: the view has nothing yet and says so."""


def request(stream: bool = False) -> hop.HopRequest:
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    return hop.HopRequest("req_view", "alpha", "gpt-4o-mini", "chat", stream, False, body)


async def test_inflight_counts_return_to_zero_for_whole_and_streamed_answers(pools):
    view = PoolView({"alpha": NoRouterHandle()})  # type: ignore[dict-item]
    view.endpoints["alpha"] = pools
    relay = HttpRelay(view.pick, SECRET, tracker=view)
    try:
        resp = await relay(request())
        assert resp.status == 200 and b"choices" in resp.body
        assert view.inflight == {}
        streamed = await relay(request(stream=True))
        assert streamed.status == 200 and streamed.close is not None
        assert sum(view.inflight.values()) == 1  # open until the stream is closed
        body = b"".join([chunk async for chunk in streamed.chunks])  # type: ignore[union-attr]
        assert b"[DONE]" in body
        await streamed.close()
        await streamed.close()  # closing twice counts once
        assert view.inflight == {}
    finally:
        await relay.close()


async def test_a_refused_endpoint_is_left_out_and_the_request_served_elsewhere(pools):
    dead = ("127.0.0.1", free_port())
    view = PoolView({"alpha": NoRouterHandle()})  # type: ignore[dict-item]
    view.endpoints["alpha"] = [dead, pools[0]]
    relay = HttpRelay(view.pick, SECRET, tracker=view)
    try:
        for _ in range(6):
            resp = await relay(request())
            assert resp.status == 200
        assert view.inflight == {}
        for _ in range(20):
            assert await view.pick("alpha", set()) == pools[0]
    finally:
        await relay.close()


async def test_the_less_busy_of_two_replicas_is_chosen():
    view = PoolView({"alpha": NoRouterHandle()})  # type: ignore[dict-item]
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    view.endpoints["alpha"] = [a, b]
    for _ in range(3):
        view.started(a)
    assert {await view.pick("alpha", set()) for _ in range(20)} == {b}
    assert await view.pick("alpha", {b}) == a  # an excluded endpoint is never chosen


async def test_no_view_yet_and_unknown_pools():
    handle = NoRouterHandle()
    assert running_endpoints(handle) is None  # type: ignore[arg-type]
    view = PoolView({"alpha": handle})  # type: ignore[dict-item]
    view.refresh()
    assert "alpha" not in view.endpoints
    with pytest.raises(LookupError):
        await view.pick("nobody", set())
