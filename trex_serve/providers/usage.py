"""One usage record for every provider format: tokens by the class they are billed at.

Each adapter fills it from its provider's own fields (OpenAI chat, OpenAI Responses, Anthropic);
billing, quota, logs, metrics and traces read only this record, never a provider's usage shape.

The classes do not overlap: ``input_tokens`` is the uncached input, so the whole prompt is
``input + cache_read + cache_write + cache_write_1h``; ``reasoning_tokens`` is the part of
``output_tokens`` the model spent thinking (billed as output unless priced apart)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The estimate's ratio wherever a count is missing: admission's estimates before the upstream counts,
# and an adapter's for a stream cut before the upstream's usage arrived. Here, below both.
CHARS_PER_TOKEN = 4

# The order of the numbers on the hop (header and stream trailer); 3 numbers is the older form.
_WIRE = ("input_tokens", "output_tokens", "estimated", "cache_read_tokens", "cache_write_tokens",
         "cache_write_1h_tokens", "reasoning_tokens")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0  # uncached input
    output_tokens: int = 0  # all output, reasoning included
    estimated: bool = False  # counted by the gateway (a cut stream, an upstream that said nothing)
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0  # 5-minute (or unspecified) cache writes
    cache_write_1h_tokens: int = 0  # Anthropic's 1-hour cache writes
    reasoning_tokens: int = 0  # within output_tokens

    # ---- totals the rest of the gateway counts in ---------------------------------------------

    @property
    def prompt_tokens(self) -> int:
        """Every input token, whatever its class (what TPM and the daily quota count)."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens + self.cache_write_1h_tokens

    @property
    def completion_tokens(self) -> int:
        return self.output_tokens

    @property
    def cache_write_total(self) -> int:
        return self.cache_write_tokens + self.cache_write_1h_tokens

    def classes(self) -> dict[str, int]:
        """The token classes by name (ledger rows, logs, the usage API)."""
        return {"input": self.input_tokens, "cache_read": self.cache_read_tokens,
                "cache_write": self.cache_write_tokens, "cache_write_1h": self.cache_write_1h_tokens,
                "output": self.output_tokens, "reasoning": self.reasoning_tokens}

    def summary(self) -> str:
        """A short text of the classes present: "1200 in + 30000 cache read + 500 out" (ledger rows)."""
        names = (("input_tokens", "in"), ("cache_read_tokens", "cache read"),
                 ("cache_write_tokens", "cache write"), ("cache_write_1h_tokens", "cache write 1h"),
                 ("output_tokens", "out"))
        parts = [f"{getattr(self, attr)} {label}" for attr, label in names if getattr(self, attr)]
        text = " + ".join(parts) or "0 tokens"
        if self.reasoning_tokens:
            text += f" ({self.reasoning_tokens} reasoning)"
        return text + (" (estimated)" if self.estimated else "")

    # ---- the hop: a pool reports usage to the ingress in a header or a stream trailer ---------

    def header(self) -> str:
        return ",".join(str(int(getattr(self, name))) for name in _WIRE)

    @classmethod
    def from_header(cls, value: str | bytes | None) -> Usage | None:
        if not value:
            return None
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        parts = value.split(",")
        if len(parts) not in (3, len(_WIRE)):
            return None
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            return None
        if any(n < 0 for n in numbers):
            return None
        fields = dict(zip(_WIRE, numbers, strict=False))
        fields["estimated"] = fields["estimated"] == 1
        return cls(**fields)

    @classmethod
    def counted(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """The gateway's own count (no provider figure): every prompt token as uncached input."""
        return cls(max(0, prompt_tokens), max(0, completion_tokens), True)

    # ---- providers' usage shapes ----------------------------------------------------------------

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """OpenAI chat (``prompt_tokens`` with ``prompt_tokens_details``) or Responses
        (``input_tokens`` with ``input_tokens_details``). OpenAI's totals include the cached part;
        ``cache_write_tokens`` is what OpenAI-compatible providers (OpenRouter, ...) report."""
        if not isinstance(usage, dict):
            return None
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            prompt, out = usage.get("prompt_tokens"), usage.get("completion_tokens")
            p_details, o_details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
        else:
            prompt, out = usage.get("input_tokens"), usage.get("output_tokens")
            p_details, o_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
        if not isinstance(prompt, int) or not isinstance(out, int):
            return None
        p_details = p_details if isinstance(p_details, dict) else {}
        o_details = o_details if isinstance(o_details, dict) else {}
        cache_read = _int(p_details.get("cached_tokens"))
        cache_write = _int(p_details.get("cache_write_tokens")) or _int(p_details.get("cache_creation_tokens"))
        uncached = max(0, prompt - cache_read - cache_write)
        return cls(uncached, max(0, out), False, cache_read, cache_write, 0,
                   min(_int(o_details.get("reasoning_tokens")), max(0, out)))

    @classmethod
    def from_anthropic(cls, usage: Any) -> Usage | None:
        """Anthropic: ``input_tokens`` excludes the cache; writes split 5m/1h in ``cache_creation``
        when given (all 5-minute otherwise)."""
        if not isinstance(usage, dict):
            return None
        inp, out = usage.get("input_tokens"), usage.get("output_tokens")
        if not isinstance(inp, int) and not isinstance(out, int):
            return None
        write = _int(usage.get("cache_creation_input_tokens"))
        split = usage.get("cache_creation")
        w5 = w1h = 0
        if isinstance(split, dict):
            w5, w1h = _int(split.get("ephemeral_5m_input_tokens")), _int(split.get("ephemeral_1h_input_tokens"))
        if w5 + w1h != write:  # no split, or one that disagrees with the total: the total wins
            w5, w1h = max(0, write - w1h), min(w1h, write)
        return cls(_int(inp), _int(out), False, _int(usage.get("cache_read_input_tokens")), w5, w1h, 0)

    # ---- the client's view ----------------------------------------------------------------------

    def openai_chat(self) -> dict[str, Any]:
        """Usage in OpenAI chat completions' fields (details only where there is something to say)."""
        prompt = self.prompt_tokens
        out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": self.output_tokens,
                               "total_tokens": prompt + self.output_tokens}
        if self.cache_read_tokens or self.cache_write_total:
            details: dict[str, Any] = {"cached_tokens": self.cache_read_tokens}
            if self.cache_write_total:
                details["cache_write_tokens"] = self.cache_write_total
            out["prompt_tokens_details"] = details
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out

    def openai_responses(self) -> dict[str, Any]:
        """Usage in the Responses API's fields."""
        prompt = self.prompt_tokens
        return {"input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": self.cache_read_tokens,
                                         "cache_write_tokens": self.cache_write_total},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": prompt + self.output_tokens}

    def anthropic(self) -> dict[str, Any]:
        """Usage in Anthropic Messages' fields (``input_tokens`` without the cache)."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_read_input_tokens": self.cache_read_tokens,
                "cache_creation_input_tokens": self.cache_write_total,
                "cache_creation": {"ephemeral_5m_input_tokens": self.cache_write_tokens,
                                   "ephemeral_1h_input_tokens": self.cache_write_1h_tokens}}
