"""The front proxy's supervisor: runs its HAProxy and keeps the data backend's server slots on the
ingress replicas' data servers that are alive (announced in Redis: web/data_endpoints.py), through
HAProxy's runtime API. A slot is given an address and made ready when a replica announces itself,
and put in maintenance when it withdraws or its announcement expires; HAProxy's own health checks
take a dead replica out sooner than that. Stopping the supervisor stops its HAProxy."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time

from trex_serve.local.front_proxy import DATA_SLOT, require_haproxy
from trex_serve.web.data_endpoints import live_endpoints

log = logging.getLogger("trex.front_sync")


def admin(socket_path: str, command: str, timeout: float = 2.0) -> str:
    """One runtime API call (several commands may be joined with ';')."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class Slots:
    """Which data-backend slot holds which endpoint; turns a new live set into runtime commands."""

    def __init__(self, count: int, backend: str = "data") -> None:
        self.count = count
        self.backend = backend
        self.held: dict[str, int] = {}

    def commands(self, live: list[str]) -> list[str]:
        out: list[str] = []
        wanted = set(live)
        for endpoint, slot in list(self.held.items()):
            if endpoint not in wanted:
                del self.held[endpoint]
                out.append(f"set server {self.backend}/{DATA_SLOT}{slot} state maint")
        free = sorted(set(range(1, self.count + 1)) - set(self.held.values()))
        for endpoint in live:
            if endpoint in self.held:
                continue
            if not free:
                log.warning("no free front-proxy slot for %s (%d slots)", endpoint, self.count)
                break
            host, _, port = endpoint.rpartition(":")
            slot = free.pop(0)
            self.held[endpoint] = slot
            name = f"{self.backend}/{DATA_SLOT}{slot}"
            out += [f"set server {name} addr {host.strip('[]')} port {port}", f"set server {name} state ready"]
        return out


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin(path, "show info")
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the front proxy's HAProxy did not start") from None
            time.sleep(0.05)


def supervise(cfg: str, socket_path: str, redis_url: str, slots: int, every_s: float = 0.25) -> int:
    from trex_serve.admission.redis_urls import sync_client

    proc = subprocess.Popen([require_haproxy(), "-db", "-f", cfg])
    stop = {"now": False}

    def _stop(*_a: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        _wait_socket(socket_path, proc)
        client = sync_client(redis_url, socket_timeout=2)  # Sentinel URLs too: it follows a failover
        table = Slots(slots)
        last: list[str] | None = None
        while not stop["now"] and proc.poll() is None:
            try:
                live = live_endpoints(client)
                if live != last:
                    commands = table.commands(live)
                    if commands:
                        admin(socket_path, ";".join(commands))
                    log.info("data servers: %s", ", ".join(live) or "none (Serve's port serves)")
                    last = live
            except Exception:  # Redis or the socket away for a moment: keep what HAProxy has
                log.warning("front proxy sync failed", exc_info=True)
            time.sleep(every_s)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return proc.returncode or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--slots", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return supervise(args.cfg, args.socket, args.redis_url, args.slots)


if __name__ == "__main__":
    sys.exit(main())
