"""Each local gateway's own range of ports for Serve's ingress replicas.

With HAProxy, every ingress replica listens on a port of its own, allocated by the cluster's
controller from one range (30000-31000 unless told otherwise). Two Ray clusters on one machine
allocate from the same range without knowing of each other, lowest port first. After a roll-over
an old, soft-stopping HAProxy worker keeps sending to the ports it knew; the controller keeps
those ports out of its own use for a while, but another cluster may bind one at once, and the
request then reaches the other gateway: its store does not know the key (401 invalid_api_key) or
it answers something that is not ours. A machine-wide registry hands each gateway a block nobody
else on the machine uses."""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from trex_serve.local.embedded import port_open

# Below Ray's shared default range and Linux's ephemeral ports, above Ray's worker ports (10002-19999).
FIRST_PORT, LAST_PORT, SPAN = 20000, 30000, 100
CLAIM_GRACE_S = 600.0  # a claim whose Ray is not up yet (its `up` is still starting) stays held


def registry_path() -> Path:
    return Path(tempfile.gettempdir()) / "trex-serve" / "ingress-ports.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, dict]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = json.loads(path.read_text()) if path.exists() and path.stat().st_size else {}
            yield entries
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries))
            tmp.replace(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(entry: dict, now: float) -> bool:
    return now - float(entry.get("claimed_at", 0)) < CLAIM_GRACE_S or port_open("127.0.0.1", int(entry["ray_port"]))


def _block_free(base: int) -> bool:
    """No port of the block is bound now (another program, or a Ray cluster not started by us)."""
    for port in range(base, base + SPAN):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def claim(home: Path, ray_port: int, path: Path | None = None, now: float | None = None) -> tuple[int, int]:
    """This gateway's [first, last) ingress ports; the same block again for the same TREX_HOME."""
    now = time.time() if now is None else now
    with _locked(path or registry_path()) as entries:
        for base, entry in list(entries.items()):
            if entry.get("home") != str(home) and not _alive(entry, now):
                del entries[base]
        mine = next((int(b) for b, e in entries.items() if e.get("home") == str(home)), None)
        if mine is None:
            mine = next((b for b in range(FIRST_PORT, LAST_PORT, SPAN)
                         if str(b) not in entries and _block_free(b)), None)
            if mine is None:
                raise RuntimeError(f"no free block of {SPAN} ingress ports in {FIRST_PORT}-{LAST_PORT}")
        entries[str(mine)] = {"home": str(home), "ray_port": ray_port, "claimed_at": now}
    return mine, mine + SPAN


def release(home: Path, path: Path | None = None) -> None:
    with _locked(path or registry_path()) as entries:
        for base, entry in list(entries.items()):
            if entry.get("home") == str(home):
                del entries[base]


def ray_env(first: int, last: int) -> dict[str, str]:
    """Serve's settings for the range (read by the controller and the replicas from Ray's environment)."""
    return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(last)}
