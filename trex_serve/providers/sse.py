"""Splitting a byte stream into whole SSE events without decoding more than needed."""

from __future__ import annotations


class EventSplitter:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events (without their blank-line terminator) found so far."""
        data = self._buf + chunk if self._buf else chunk
        data = data.replace(b"\r\n", b"\n") if b"\r" in data else data
        parts = data.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p]

    def rest(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


def data_of(event: bytes) -> bytes | None:
    """The joined `data:` payload of one event, or None for comments/other fields."""
    out = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            out.append(line[5:].lstrip(b" "))
    return b"\n".join(out) if out else None


def usage_comment(prompt: int, completion: int, estimated: bool) -> bytes:
    """An SSE comment the ingress reads for settlement; SSE clients ignore comments."""
    return b": trex-usage %d,%d,%d\n\n" % (prompt, completion, int(estimated))


def parse_usage_comment(tail: bytes) -> tuple[int, int, bool] | None:
    idx = tail.rfind(b": trex-usage ")
    if idx < 0:
        return None
    end = tail.find(b"\n", idx)
    if end < 0:
        return None
    try:
        p, c, e = tail[idx + 13:end].split(b",")
        return int(p), int(c), e == b"1"
    except ValueError:
        return None
