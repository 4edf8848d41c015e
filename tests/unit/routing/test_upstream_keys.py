"""Managed key pools: the catalog format and the account → key choice (weighted rendezvous)."""

from __future__ import annotations

from collections import Counter

import pytest

from trex_serve.catalog import CatalogError, UpstreamKey, parse_catalog
from trex_serve.routing.upstream_keys import rendezvous_order


def _catalog(provider: dict) -> dict:
    return {"providers": [{"name": "p", "base_url": "http://x/v1", **provider}],
            "models": [{"id": "m", "candidates": [{"provider": "p", "model": "m"}]}]}


def test_catalog_reads_several_keys_with_weights_and_budgets(monkeypatch):
    monkeypatch.setenv("TREX_T_KEY_A", "sk-aaaaaaaa")
    cat = parse_catalog(_catalog({"keys": [{"env": "TREX_T_KEY_A", "weight": 2, "rpm": 500, "tpm": 90000},
                                           {"env": "TREX_T_KEY_B", "id": "backup"}]}))
    p = cat.provider("p")
    assert [k.key_id for k in p.keys] == ["TREX_T_KEY_A", "backup"]
    assert (p.keys[0].weight, p.keys[0].rpm, p.keys[0].tpm) == (2, 500, 90000)
    assert p.upstream_key("backup").env == "TREX_T_KEY_B"
    assert p.callable_without_binding()  # one of the keys is set
    monkeypatch.delenv("TREX_T_KEY_A")
    assert not p.callable_without_binding()  # none is: accounts must bind their own key


@pytest.mark.parametrize("provider, field", [
    ({"api_key_env": "A", "keys": [{"env": "B"}]}, "exclusive"),
    ({"keys": [{"env": "A"}, {"env": "B", "id": "A"}]}, "duplicate key id"),
    ({"keys": [{"env": "A", "weight": 0}]}, "providers.0.keys.0.weight"),
    ({"keys": [{"env": "A", "rpm": 0}]}, "providers.0.keys.0.rpm"),
    ({"keys": [{"env": "bad-name"}]}, "providers.0.keys.0.env"),
])
def test_catalog_rejects_bad_key_pools(provider, field):
    with pytest.raises(CatalogError, match=field):
        parse_catalog(_catalog(provider))


KEYS = [UpstreamKey(env="K1"), UpstreamKey(env="K2"), UpstreamKey(env="K3", weight=2)]


def test_three_keys_weighted_1_1_2_spread_within_10_percent_over_3000_accounts():
    firsts = Counter(rendezvous_order(f"acct_{i}", KEYS)[0].key_id for i in range(3000))
    for key, share in (("K1", 0.25), ("K2", 0.25), ("K3", 0.5)):
        assert abs(firsts[key] - 3000 * share) <= 0.1 * 3000 * share, firsts


def test_an_account_keeps_its_key_and_order_on_every_request():
    orders = {tuple(k.key_id for k in rendezvous_order("acct_42", KEYS)) for _ in range(50)}
    assert len(orders) == 1
    assert sorted(next(iter(orders))) == ["K1", "K2", "K3"]  # every key, the fallbacks in a fixed order


def test_adding_a_key_moves_only_its_share_of_accounts_and_only_to_it():
    added = [*KEYS, UpstreamKey(env="K4")]  # weight 1 of 5
    moved = 0
    for i in range(3000):
        before = rendezvous_order(f"acct_{i}", KEYS)[0].key_id
        after = rendezvous_order(f"acct_{i}", added)[0].key_id
        if before != after:
            moved += 1
            assert after == "K4"  # nobody moves between the old keys
    assert abs(moved - 600) <= 60, moved


def test_a_key_out_sends_its_accounts_to_their_next_key_and_nobody_else_moves():
    for i in range(500):
        order = [k.key_id for k in rendezvous_order(f"acct_{i}", KEYS)]
        without = [k.key_id for k in rendezvous_order(f"acct_{i}", [k for k in KEYS if k.key_id != "K2"])]
        assert without == [k for k in order if k != "K2"]
