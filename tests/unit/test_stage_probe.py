"""The stage timers are off unless TREX_STAGE_PROBE is set: nothing on the hot path is wrapped."""

from fastapi import FastAPI

from trex_serve import stage_probe
from trex_serve.keygate import KeyGate
from trex_serve.pipeline import Pipeline
from trex_serve.pool_server import PoolServer
from trex_serve.relay import HttpRelay


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("TREX_STAGE_PROBE", raising=False)
    before = (KeyGate.admit, KeyGate.settle, Pipeline.chat, HttpRelay.__init__, HttpRelay.__call__,
              FastAPI.__call__, PoolServer.relay)
    stage_probe.install_ingress()
    stage_probe.install_pool()
    after = (KeyGate.admit, KeyGate.settle, Pipeline.chat, HttpRelay.__init__, HttpRelay.__call__,
             FastAPI.__call__, PoolServer.relay)
    assert before == after
    assert stage_probe.STAGES == {}
