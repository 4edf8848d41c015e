"""Edit the top level of a JSON object in its own bytes: set some members' values, drop others, and
leave every other byte as the client wrote it (whitespace, key order, escapes, number spellings).

A same-format pass-through uses it to send a request body "as sent" with only the model name
rewritten: parsing and re-serialising would be equal in meaning but not in bytes, and a client that
checks what reached the provider (or a provider that hashes the prompt) sees the difference. The
members are walked with the standard library's C scanner, which returns where each value ends; only
the top-level values are looked at, and a body of ~170 KB takes ~0.2 ms (like one orjson round trip)."""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

_scan_value = json.scanner.make_scanner(json.JSONDecoder())
_scan_string = json.decoder.scanstring
_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class _Member:
    key: str
    start: int  # the key's opening quote
    value_start: int
    end: int  # just past the value
    next_start: int | None  # the next member's key, when a comma follows


def _skip(text: str, at: int) -> int:
    return _WS.match(text, at).end()  # type: ignore[union-attr]  (the pattern matches the empty string)


def _members(text: str) -> tuple[int, list[_Member]]:
    """The index just past ``{`` and the top-level members, in order. ValueError when ``text`` is
    not one JSON object."""
    at = _skip(text, 0)
    if text[at:at + 1] != "{":
        raise ValueError("not a JSON object")
    opened = at + 1
    at = _skip(text, opened)
    members: list[_Member] = []
    if text[at:at + 1] == "}":
        return opened, members
    try:
        while True:
            if text[at:at + 1] != '"':
                raise ValueError(f"expected a key at {at}")
            key, after_key = _scan_string(text, at + 1)
            colon = _skip(text, after_key)
            if text[colon:colon + 1] != ":":
                raise ValueError(f"expected ':' at {colon}")
            value_start = _skip(text, colon + 1)
            _, end = _scan_value(text, value_start)
            follow = _skip(text, end)
            char = text[follow:follow + 1]
            if char == ",":
                nxt = _skip(text, follow + 1)
                members.append(_Member(key, at, value_start, end, nxt))
                at = nxt
                continue
            if char != "}" or _skip(text, follow + 1) != len(text):
                raise ValueError(f"unexpected {char!r} at {follow}")
            members.append(_Member(key, at, value_start, end, None))
            return opened, members
    except StopIteration as exc:  # the scanner's way of saying "no value here"
        raise ValueError(f"expected a value at {exc.value}") from None
    except RecursionError:  # nested deeper than the scanner goes (orjson reads 1,024 levels)
        raise ValueError("nested too deeply") from None


def edit_top_level(raw: bytes, set_values: Mapping[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    """``raw`` (a JSON object) with each member named in ``set_values`` given that value (every
    occurrence, should the key repeat; appended first when absent) and each member named in
    ``drop`` removed. Everything else is byte for byte. ValueError when ``raw`` is not a JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    opened, members = _members(text)
    kept = [m for m in members if m.key not in drop]
    # Around the members: "{" with the whitespace after it, and the whitespace before "}" with it.
    out = [text[:members[0].start if members else opened]]
    missing = [k for k in set_values if k not in {m.key for m in members}]
    if missing:
        out.append(",".join(f"{orjson.dumps(k).decode()}:{orjson.dumps(set_values[k]).decode()}" for k in missing)
                   + ("," if kept else ""))
    for j, m in enumerate(kept):
        out.append(text[m.start:m.value_start])
        out.append(orjson.dumps(set_values[m.key]).decode() if m.key in set_values else text[m.value_start:m.end])
        if j < len(kept) - 1:  # the separator the client wrote after this member (a dropped one's is gone)
            out.append(text[m.end:m.next_start] if m.next_start is not None else ",")
    out.append(text[members[-1].end if members else opened:])
    return "".join(out).encode("utf-8")
