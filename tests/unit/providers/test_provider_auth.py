"""Provider auth styles as catalog data: the key in a named header (with or without a scheme), fixed
query parameters merged into the upstream URL, for every format through one helper; header names
validated when the catalog loads."""

from __future__ import annotations

import pytest
import yaml

from trex_serve.catalog import CatalogError, Provider, parse_catalog
from trex_serve.providers.registry import adapter_for

CHAT = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}


def build(fmt: str, key: str | None = "sk-test-key", **provider):
    spec = Provider(name="p", format=fmt, **{"base_url": "https://up.example/v1", **provider})
    return adapter_for(fmt).build("chat", CHAT, "m", False, key, spec)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_azure_api_key_header_without_scheme_and_api_version_query():
    call = build("openai", base_url="https://res.openai.azure.com/openai/deployments/gpt-4o",
                 auth_header="api-key", query={"api-version": "2024-10-21"})
    assert call.url == "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    headers = lower(call.headers)
    assert headers["api-key"] == "sk-test-key"
    assert "authorization" not in headers
    assert headers["content-type"] == "application/json"


def test_gemini_goog_api_key_header():
    call = build("openai", base_url="https://generativelanguage.googleapis.com/v1beta/openai/",
                 auth_header="x-goog-api-key")
    assert call.url == "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
    assert lower(call.headers)["x-goog-api-key"] == "sk-test-key" and "authorization" not in lower(call.headers)


def test_the_same_helper_serves_the_anthropic_format_and_each_formats_default_stays():
    assert build("openai").headers["Authorization"] == "Bearer sk-test-key"
    call = build("anthropic")
    assert call.headers["x-api-key"] == "sk-test-key" and "authorization" not in lower(call.headers)
    assert call.url == "https://up.example/v1/messages"
    # An Anthropic-format gateway that takes a bearer token instead of x-api-key.
    call = build("anthropic", auth_header="Authorization", auth_scheme="Bearer", query={"beta": "true"})
    headers = lower(call.headers)
    assert headers["authorization"] == "Bearer sk-test-key" and "x-api-key" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert call.url == "https://up.example/v1/messages?beta=true"


def test_a_scheme_alone_changes_the_default_headers_scheme():
    assert build("openai", auth_scheme="Token").headers["Authorization"] == "Token sk-test-key"


def test_query_merges_with_the_base_urls_own_and_is_url_encoded():
    call = build("openai", base_url="https://up.example/v1/?api-version=2020-01-01&tenant=a%20b",
                 query={"api-version": "2024-10-21", "sig": "x y&z=1/2"})
    assert call.url == ("https://up.example/v1/chat/completions"
                        "?tenant=a%20b&api-version=2024-10-21&sig=x%20y%26z%3D1%2F2")


def test_base_url_query_alone_keeps_the_path_before_it():
    call = build("openai", base_url="https://up.example/v1?api-version=2024-10-21")
    assert call.url == "https://up.example/v1/chat/completions?api-version=2024-10-21"


def test_the_key_replaces_a_static_header_of_the_same_name_in_any_case():
    call = build("openai", auth_header="api-key", headers={"API-KEY": "stale", "X-Other": "1"})
    assert call.headers == {"Content-Type": "application/json", "X-Other": "1", "api-key": "sk-test-key"}


def test_without_a_key_no_auth_header_is_sent():
    call = build("openai", key=None, auth_header="api-key", query={"api-version": "2024-10-21"})
    assert "api-key" not in lower(call.headers) and "authorization" not in lower(call.headers)
    assert call.url.endswith("?api-version=2024-10-21")


def catalog(provider_yaml: str):
    data = yaml.safe_load(f"""
providers:
  - name: azure
    base_url: https://res.openai.azure.com/openai/deployments/gpt-4o
{provider_yaml}
models:
  - id: m
    candidates: [{{provider: azure, model: gpt-4o}}]
""")
    return parse_catalog(data, "cat.yaml")


def test_an_unquoted_yaml_date_is_the_api_version_string():
    provider = catalog("    auth_header: api-key\n    query: {api-version: 2024-10-21}").provider("azure")
    assert provider.query == {"api-version": "2024-10-21"}


PATTERN = "String should match pattern"


@pytest.mark.parametrize("field,value,message", [
    ("auth_header", "'api key'", f"providers.0.auth_header: {PATTERN}"),
    ("auth_header", "'x-key:'", f"providers.0.auth_header: {PATTERN}"),
    ("auth_header", "\"api-key\\r\\nX-Injected: 1\"", f"providers.0.auth_header: {PATTERN}"),
    ("auth_header", "''", f"providers.0.auth_header: {PATTERN}"),
    ("auth_header", "Content-Type", "not a header a key can travel in"),
    ("auth_header", "host", "not a header a key can travel in"),
    ("auth_scheme", "'Bearer x'", f"providers.0.auth_scheme: {PATTERN}"),
    ("query", "{'': x}", "query: a parameter needs a name"),
    ("query", "[api-version]", "providers.0.query: Input should be a valid dictionary"),
    ("query", "{a: [1]}", "providers.0.query.a: Input should be a valid string"),
])
def test_bad_auth_fields_are_refused_naming_the_field(field, value, message):
    with pytest.raises(CatalogError, match="cat.yaml") as info:
        catalog(f"    {field}: {value}")
    assert message in str(info.value)
