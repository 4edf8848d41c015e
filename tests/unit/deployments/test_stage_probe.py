"""The stage timers are off unless TREX_STAGE_PROBE is set: nothing on the hot path is wrapped."""

from fastapi import FastAPI

from deployments import stage_probe
from trex_serve.admission.keygate import KeyGate
from trex_serve.hop.pool_server import PoolServer
from trex_serve.hop.relay import HttpRelay
from trex_serve.pipeline.request_path import Pipeline


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
