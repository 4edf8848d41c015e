"""Reasoning across the OpenAI ↔ Anthropic pair: an OpenAI effort as Anthropic thinking (in the form
the upstream model takes), and Anthropic's thinking blocks kept whole on their way to the client
and back (docs/REASONING.md).

On the chat route a message carries the thinking as ``reasoning_content`` (its text, the field
clients read) and ``thinking_blocks`` (the blocks as Anthropic sent them, signatures and redacted
data included): a client that sends the assistant turn back in a tool loop sends the blocks, and
they reach Anthropic verbatim — Anthropic refuses a tool loop whose signed thinking was dropped."""

from __future__ import annotations

from typing import Any

from trex_serve.errors import InvalidRequest

# OpenAI's reasoning efforts. "none" asks for no reasoning at all.
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# Older Anthropic models: thinking {type: enabled, budget_tokens}; Anthropic's minimum budget is 1,024.
BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
# Newer models: thinking {type: adaptive} with output_config {effort}; they know low/medium/high/max.
ADAPTIVE_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "max"}
# Sampling settings Anthropic refuses while thinking is on.
_NOT_WITH_THINKING = ("temperature", "top_p", "top_k")
_BLOCK_TYPES = ("thinking", "redacted_thinking")


def check_effort(value: Any, param: str) -> None:
    """400 naming the field for an effort the routes do not know (before anything is admitted)."""
    if value is None:
        return
    if not isinstance(value, str) or value not in EFFORTS:
        raise InvalidRequest(f"Invalid value for '{param}': {value!r}. Supported values are: "
                             + ", ".join(f"'{e}'" for e in EFFORTS) + ".", param=param)


def apply_effort(out: dict[str, Any], effort: Any, form: str | None) -> None:
    """Turn OpenAI's ``reasoning_effort`` into Anthropic's thinking on a Messages request."""
    if not isinstance(effort, str) or effort not in BUDGETS:
        return  # None / "none": no thinking
    if _turn_without_thinking(out.get("messages") or []):
        return  # Anthropic would refuse the request with thinking on; without, it answers
    if form == "adaptive":
        out["thinking"] = {"type": "adaptive"}
        out["output_config"] = {**(out.get("output_config") or {}), "effort": ADAPTIVE_EFFORTS[effort]}
    else:
        budget = BUDGETS[effort]
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if int(out.get("max_tokens") or 0) <= budget:
            # max_tokens counts the thinking too and must exceed the budget: room for the answer on top
            out["max_tokens"] = budget + int(out.get("max_tokens") or 0)
    for key in _NOT_WITH_THINKING:
        out.pop(key, None)


def _turn_without_thinking(messages: list[dict[str, Any]]) -> bool:
    """Whether the assistant turn in progress began without a thinking block: a tool loop (or a
    prefill) whose first assistant message the client sent back without its ``thinking_blocks``,
    or that another provider or an unthinking request produced. Anthropic refuses thinking then
    ("a final assistant message must start with a thinking block")."""
    start: list[Any] | None = None
    for msg in reversed(messages):
        content = msg.get("content")
        blocks = content if isinstance(content, list) else []
        if msg.get("role") == "assistant":
            start = blocks
        elif not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
            break  # the user's own message: the turn began after it
    return start is not None and not (start and isinstance(start[0], dict) and start[0].get("type") in _BLOCK_TYPES)


def request_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """The thinking blocks of an assistant message sent back by the client, verbatim (an empty
    thinking text beside its signature included). ``reasoning_content`` alone has no signature and
    cannot be sent back as thinking: it is dropped."""
    blocks = msg.get("thinking_blocks")
    if not isinstance(blocks, list):
        return []
    out = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
            continue
        if block["type"] == "thinking" and not block.get("signature"):
            continue
        # Only the fields Anthropic's schema has: never a cache_control (a thinking block with one is a 400).
        keep = ("thinking", "signature") if block["type"] == "thinking" else ("data",)
        out.append({"type": block["type"], **{k: block.get(k) or "" for k in keep}})
    return out


def answer_fields(content: list[Any]) -> dict[str, Any]:
    """``reasoning_content`` and ``thinking_blocks`` for a chat message from Anthropic's content."""
    blocks = [b for b in content if isinstance(b, dict) and b.get("type") in _BLOCK_TYPES]
    if not blocks:
        return {}
    text = "".join(str(b.get("thinking") or "") for b in blocks if b["type"] == "thinking")
    return {"reasoning_content": text,
            "thinking_blocks": [{k: v for k, v in b.items() if k in ("type", "thinking", "signature", "data")}
                                for b in blocks]}
