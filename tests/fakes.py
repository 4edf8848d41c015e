"""An open gate for unit tests of the data path alone (routing, fallback, streaming): it lets every
request through and counts settlements, so tests can assert exactly-once settlement."""

from __future__ import annotations

from trex_serve.gate import AdmitAsk, Principal, Settlement, Ticket
from trex_serve.routing import Resolution


class CountingGate:
    def __init__(self, catalog) -> None:
        self.catalog = catalog
        self.settlements: list[Settlement] = []
        self.admitted = 0

    async def authenticate(self, authorization, client_ip) -> Principal:
        return Principal("key_test", "acc_test", "trex-test", "free")

    def visible_models(self, principal) -> list[str]:
        return ["smart-auto", *[m.id for m in self.catalog.models]]

    def check_model(self, principal, resolution: Resolution) -> None:
        return None

    async def admit(self, principal, ask: AdmitAsk) -> Ticket:
        self.admitted += 1
        return Ticket(principal, "quota", ask.request_id, ask.prompt_tokens, 0, "lease-1")

    async def provider_key(self, principal, provider, override):
        return override

    async def settle(self, ticket, settlement: Settlement) -> int:
        self.settlements.append(settlement)
        return 0
