"""Each provider format's adapter, in one table. The adapters import the interface (base.py), this
module imports the adapters: the dependency runs one way, and a format missing from the table is
an error at the first request rather than an import swallowed somewhere."""

from __future__ import annotations

from trex_serve.providers.anthropic import AnthropicAdapter
from trex_serve.providers.base import Adapter
from trex_serve.providers.openai_chat import OpenAIChatAdapter

ADAPTERS: dict[str, Adapter] = {adapter.format: adapter for adapter in (OpenAIChatAdapter(), AnthropicAdapter())}


def adapter_for(fmt: str) -> Adapter:
    adapter = ADAPTERS.get(fmt)
    if adapter is None:
        raise ValueError(f"no adapter for provider format {fmt!r}")
    return adapter
