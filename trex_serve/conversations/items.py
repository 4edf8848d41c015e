"""A turn's items, as pure functions: the stored form of a request's input (every item with an id, as
``GET /v1/responses/{id}/input_items`` lists them), the history a continued conversation sends
(earlier input, earlier output, in order), and the listing's pagination."""

from __future__ import annotations

from typing import Any

from trex_serve.api.responses import new_id
from trex_serve.errors import InvalidRequest

# The id prefix OpenAI uses for each item type; anything else gets a neutral one.
_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
# Items a client sends (never produced by a model): their ids are the gateway's bookkeeping only.
_INPUT_SIDE = ("function_call_output",)
MAX_LIST_LIMIT = 100


def _kind(item: dict[str, Any]) -> str:
    kind = item.get("type")
    if isinstance(kind, str):
        return kind
    return "message" if "role" in item else "item"


def _message(item: dict[str, Any]) -> dict[str, Any]:
    """The full form of a message item: content as a list of typed parts (a string is one part)."""
    out = {"type": "message", **item}
    content = out.get("content")
    if isinstance(content, str):
        part = "output_text" if out.get("role") == "assistant" else "input_text"
        out["content"] = [{"type": part, "text": content, **({"annotations": []} if part == "output_text" else {})}]
    out.setdefault("status", "completed")
    return out


def stored_input(given: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as stored items, each with an ``id`` (ours when the client sent none),
    never mutating the request's own objects."""
    if given is None:
        return []
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    out: list[dict[str, Any]] = []
    for raw in given:
        if not isinstance(raw, dict):
            continue  # validation (api/input_checks.py) refused these already
        kind = _kind(raw)
        item = _message(raw) if kind == "message" else dict(raw)
        if not isinstance(item.get("id"), str) or not item["id"]:
            item["id"] = new_id(_PREFIX.get(kind, "item"))
            item["trex_id"] = True  # ours: left out when the item is sent again (below)
        out.append(item)
    return out


def _replay(item: dict[str, Any], *, output: bool) -> dict[str, Any]:
    """An item as a next turn sends it: what the client or the model produced, without the ids the
    gateway gave the client's own input items (a provider knows nothing of them)."""
    out = {k: v for k, v in item.items() if k != "trex_id"}
    if not output and (item.get("trex_id") or _kind(item) in _INPUT_SIDE
                       or (_kind(item) == "message" and item.get("role") != "assistant")):
        out.pop("id", None)
        out.pop("status", None)
    return out


def listed(item: dict[str, Any]) -> dict[str, Any]:
    """An item as the input_items listing shows it (our bookkeeping flag left out)."""
    return {k: v for k, v in item.items() if k != "trex_id"} if "trex_id" in item else item


def history(turns: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The conversation so far, oldest first: each turn's input items, then its output items.
    (``instructions`` are not carried over: OpenAI documents that each request's own apply.)"""
    items: list[dict[str, Any]] = []
    for inputs, outputs in turns:
        items.extend(_replay(i, output=False) for i in inputs)
        items.extend(_replay(o, output=True) for o in outputs if isinstance(o, dict))
    return items


def continued(payload: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """The request body a provider gets for a continued conversation: the history, then this turn's
    own input as the client sent it, and no ``previous_response_id`` (it means nothing upstream)."""
    given = payload.get("input")
    now = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
    out = {k: v for k, v in payload.items() if k != "previous_response_id"}
    out["input"] = [*earlier, *now]
    return out


def page(items: list[dict[str, Any]], *, limit: int, order: str, after: str | None,
         before: str | None) -> dict[str, Any]:
    """One page of a list of items, OpenAI's cursor pagination: ``order`` asc (conversation order) or
    desc (newest first, the default), ``after``/``before`` an item id of the previous page."""
    seq = list(items) if order == "asc" else list(reversed(items))
    ids = [i.get("id") for i in seq]
    start, end = 0, len(seq)
    if after is not None:
        if after not in ids:
            raise InvalidRequest(f"No item with id '{after}' in this list.", param="after")
        start = ids.index(after) + 1
    if before is not None:
        if before not in ids:
            raise InvalidRequest(f"No item with id '{before}' in this list.", param="before")
        end = ids.index(before)
        start = max(start, end - limit) if after is None else start
    chosen = seq[start:end][:limit]
    data = [listed(i) for i in chosen]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + len(chosen) < end}


def list_params(query: dict[str, str]) -> tuple[int, str, str | None, str | None]:
    """``limit`` (1-100, default 20), ``order`` (asc|desc, default desc), ``after``, ``before``: a bad
    value is a 400 naming the parameter, as OpenAI answers."""
    raw = query.get("limit")
    try:
        limit = 20 if raw in (None, "") else int(raw)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidRequest("limit must be an integer from 1 to 100.", param="limit") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequest("limit must be an integer from 1 to 100.", param="limit")
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    return limit, order, query.get("after") or None, query.get("before") or None
