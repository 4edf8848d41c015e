"""Cheap token estimates for admission (TPM, quota and credit reservations) before the upstream counts."""

from __future__ import annotations

from typing import Any

from trex_serve.providers.usage import CHARS_PER_TOKEN

PER_MESSAGE_OVERHEAD = 4
DEFAULT_OUTPUT_TOKENS = 512


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
                elif part.get("type") in ("image_url", "input_image", "image"):
                    total += 85 * CHARS_PER_TOKEN  # a low-detail image costs ~85 tokens
            elif isinstance(part, str):
                total += len(part)
        return total
    if isinstance(content, dict):
        return _content_chars(content.get("text") or content.get("content"))
    return len(str(content))


def estimate_messages(messages: list[Any]) -> int:
    chars = 0
    count = 0
    for message in messages:
        count += 1
        if isinstance(message, dict):
            chars += _content_chars(message.get("content"))
            if message.get("tool_calls"):
                chars += len(str(message["tool_calls"]))
        else:
            chars += _content_chars(getattr(message, "content", None))
    return chars // CHARS_PER_TOKEN + PER_MESSAGE_OVERHEAD * count + 3


def estimate_text(text: str | bytes) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN) if text else 0
