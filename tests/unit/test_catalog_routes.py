"""Catalog rules a request relies on: which providers need a key, which fallback pairs are allowed."""

from __future__ import annotations

import pytest

from trex_serve.catalog import CatalogError, parse_catalog
from trex_serve.errors import InvalidRequest
from trex_serve.routing.request_routing import TrexRouting
from trex_serve.routing.resolve import resolve

CATALOG = {
    "providers": [
        {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key_env": "TREX_TEST_NEVER_SET_KEY"},
        {"name": "local", "base_url": "http://127.0.0.1:8001/v1", "auth": "none"},
        {"name": "bare", "base_url": "http://127.0.0.1:8002/v1"},
        {"name": "idle", "base_url": "http://127.0.0.1:8003/v1", "auth": "none"},
    ],
    "models": [
        {"id": "gpt-4o-mini", "candidates": [{"provider": "openai", "model": "gpt-4o-mini"},
                                             {"provider": "local", "model": "qwen-7b"}]},
        {"id": "gpt-4o", "tier": "premium", "candidates": [{"provider": "openai", "model": "gpt-4o"}]},
        {"id": "llama", "candidates": [{"provider": "bare", "model": "llama-3"}]},
    ],
}


def catalog():
    return parse_catalog(CATALOG)


def test_only_auth_none_or_a_set_managed_key_serves_without_a_binding(monkeypatch):
    c = catalog()
    assert c.provider("local").callable_without_binding()
    assert not c.provider("bare").callable_without_binding()  # no key anywhere: accounts must bind one
    assert not c.provider("openai").callable_without_binding()
    monkeypatch.setenv("TREX_TEST_NEVER_SET_KEY", "sk-managed")
    assert c.provider("openai").callable_without_binding()


def test_auth_none_with_a_managed_key_is_refused():
    bad = {**CATALOG, "providers": [{"name": "x", "base_url": "http://x", "auth": "none", "api_key_env": "K"}],
           "models": [{"id": "m", "candidates": [{"provider": "x", "model": "m"}]}]}
    with pytest.raises(CatalogError, match="auth: none takes no api_key_env"):
        parse_catalog(bad)
    with pytest.raises(CatalogError, match="providers.0.auth"):
        parse_catalog({**bad, "providers": [{"name": "x", "base_url": "http://x", "auth": "bearer-ish"}]})


def test_fallback_pairs_from_the_catalog_are_accepted_in_order():
    routing = TrexRouting(fallbacks=[{"provider": "local", "model": "qwen-7b"}])
    res = resolve(catalog(), "gpt-4o-mini", routing)
    assert [t.key for t in res.targets] == [("openai", "gpt-4o-mini"), ("local", "qwen-7b")]
    # The public id names the same route.
    res = resolve(catalog(), "llama", TrexRouting(fallbacks=[{"provider": "local", "model": "gpt-4o-mini"}]))
    assert [t.key for t in res.targets] == [("bare", "llama-3"), ("local", "qwen-7b")]


def test_fallback_pair_outside_the_catalog_names_the_allowed_routes():
    routing = TrexRouting(fallbacks=[{"provider": "local", "model": "qwen-7b"},
                                     {"provider": "openai", "model": "gpt-5-turbo"}])
    with pytest.raises(InvalidRequest) as err:
        resolve(catalog(), "gpt-4o-mini", routing)
    assert err.value.param == "trex.routing.fallbacks[1]"
    msg = err.value.message
    assert "openai/gpt-5-turbo" in msg and "billed at catalog prices" in msg
    assert "openai/gpt-4o-mini" in msg and "openai/gpt-4o" in msg and "qwen" not in msg


def test_fallback_to_an_unknown_or_idle_provider_says_so():
    with pytest.raises(InvalidRequest) as err:
        resolve(catalog(), "gpt-4o-mini", TrexRouting(fallbacks=[{"provider": "nope", "model": "m"}]))
    assert "Unknown provider 'nope'" in err.value.message and "openai, local, bare, idle" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        resolve(catalog(), "gpt-4o-mini", TrexRouting(fallbacks=[{"provider": "idle", "model": "m"}]))
    assert "serves no model" in err.value.message
