"""A model whose every provider was down answers again soon after one recovers, through the real
data path (pipeline → relay hop → pool server → mock upstream processes), with circuits whose
cool-down is a minute: the old routing kept such a model dark for that minute."""

from __future__ import annotations

import asyncio
import time

from tests.fakes import data_path_client
from tests.helpers import write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.routing.health import HealthPolicy

COOLDOWN_S = 60.0
POLICY = HealthPolicy(cooldown_s=COOLDOWN_S, panic_probe_interval_s=0.5)


async def steady(gw, seconds: float, every: float = 0.1) -> list[tuple[float, int]]:
    """Requests at a steady pace, each one waited for; (time sent, status)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent = time.monotonic()
        r = await gw.post("/v1/chat/completions", json={"model": "gpt-4o-mini",
                                                        "messages": [{"role": "user", "content": "hi"}]})
        out.append((sent, r.status_code))
        await asyncio.sleep(max(0.0, sent + every - time.monotonic()))
    return out


async def test_dark_model_answers_again_soon_after_its_providers_recover(mocks, tmp_path):
    for m in mocks.values():
        m.reset()
        m.control(error_rate=1.0, error_status=503)
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks))
    async with data_path_client(catalog, POLICY) as gw:
        await steady(gw, 1.0)  # both circuits open within the first requests
        opened = {k: gw.tracker.health(*k) for k in (("alpha", "alpha-mini"), ("beta", "beta-mini"))}
        assert all(h.state == "open" and h.open_until - time.time() > COOLDOWN_S - 5 for h in opened.values())
        # While both are down and open, each is probed at a bounded rate.
        before = {n: m.stats()["requests"] for n, m in mocks.items()}
        window = time.monotonic()
        during = await steady(gw, 3.0)
        window = time.monotonic() - window
        probes = {n: m.stats()["requests"] - before[n] for n, m in mocks.items()}
        assert all(s in (502, 503) for _, s in during)
        for n, count in probes.items():
            assert 1 <= count <= window / 0.5 + 2, (n, count, window)
        for m in mocks.values():
            m.reset()
        healed = time.monotonic()
        after = await steady(gw, 4.0)
    first_ok = min((sent for sent, s in after if s == 200), default=None)
    assert first_ok is not None, after
    # Found within a probe interval or so (generous for a loaded machine), not after the minute.
    assert first_ok - healed < 3.0, first_ok - healed
    # And it keeps answering: the replica that saw the probe succeed trusts it before the table does.
    assert all(s == 200 for sent, s in after if sent >= first_ok), after
