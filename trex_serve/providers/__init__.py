"""Provider adapters: one module per client-API × provider-format pair, behind one interface."""

from trex_serve.providers.base import Adapter, StreamTranslator, Usage

__all__ = ["Adapter", "StreamTranslator", "Usage"]
