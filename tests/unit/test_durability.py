"""Durable counter writes (redis_durability.py): a batch's replies are released only when the
trailing WAIT says enough replicas acknowledged it."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from trex_serve.redis_durability import Durability, NotReplicated
from trex_serve.settings import Settings


def test_results_pass_when_acknowledged_and_turn_into_not_replicated_otherwise():
    d = Durability(1)
    err = ResponseError("NOSCRIPT")
    assert d.results(["a", err, 1]) == ["a", err]
    short = d.results(["a", err, 0])
    assert isinstance(short[0], NotReplicated) and short[0].reply == "a" and short[1] is err
    assert isinstance(d.results(["a", ResponseError("ERR WAIT cannot be used")])[0], NotReplicated)


def test_guard_holds_each_reply_until_the_wait_answers():
    got: list = []
    commands, handlers = Durability(2, 50).guard([("EVALSHA", "x")] * 2,
                                                 [lambda r, e, i=i: got.append((i, r, e)) for i in range(2)])
    assert commands[-1] == ("WAIT", 2, 50) and len(handlers) == 3
    handlers[0]("first", None)
    handlers[1]("second", None)
    assert got == [], "nothing before the replicas acknowledged"
    handlers[2](2, None)
    assert got == [(0, "first", None), (1, "second", None)]


def test_guard_hands_a_lost_connection_to_every_call():
    got: list = []
    _, handlers = Durability(1).guard([("EVALSHA", "x")], [lambda r, e: got.append((r, e))])
    lost = RedisConnectionError("gone")
    handlers[0](None, lost)
    handlers[1](None, lost)
    assert got == [(None, lost)]


def test_settings_turn_it_on_by_environment(monkeypatch):
    monkeypatch.delenv("TREX_REDIS_WAIT_REPLICAS", raising=False)
    assert Settings.from_env().durability() is None
    monkeypatch.setenv("TREX_REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("TREX_REDIS_WAIT_TIMEOUT_MS", "250")
    assert Settings.from_env().durability() == Durability(2, 250, 10.0)
    monkeypatch.setenv("TREX_REDIS_WAIT_TIMEOUT_MS", "0")
    with pytest.raises(ValueError, match="TREX_REDIS_WAIT_TIMEOUT_MS"):
        Settings.from_env().durability()
