"""The local processes `trex-serve up` starts and `down` stops: mock upstreams, the front proxy,
Redis bookkeeping, and finding exactly this gateway's Ray processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from trex_serve.local.embedded import port_open

DEMO_MOCKS = {"mock-openai": 9201, "mock-backup": 9202, "mock-anthropic": 9203}


def say(msg: str) -> None:
    print(f"[trex-serve] {msg}", flush=True)


def persisted_secret(home: Path, name: str) -> str:
    path = home / name
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    path.write_text(value)
    path.chmod(0o600)
    return value


def saved_pids(home: Path) -> dict[str, int]:
    path = home / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_pid(home: Path, name: str, pid: int) -> None:
    pids = saved_pids(home)
    pids[name] = pid
    (home / "pids.json").write_text(json.dumps(pids))


def stop_saved(home: Path, timeout: float = 10.0) -> list[str]:
    """Stop the processes `up` recorded (Redis, the front proxy, the demo mocks), each with its
    process group, and return once they are gone: Redis takes a moment to save on SIGTERM, and an
    `up` right after must find its ports free."""
    stopping: dict[str, psutil.Process] = {}
    for name, pid in saved_pids(home).items():
        try:
            stopping[name] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    _, alive = psutil.wait_procs(list(stopping.values()), timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return list(stopping)


def start_mocks(home: Path) -> None:
    for name, port in DEMO_MOCKS.items():
        if port_open("127.0.0.1", port):
            say(f"mock upstream {name} already answering on {port}")
            continue
        log = open(home / f"mock-{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "trex_serve.local.mock_upstream", "--port", str(port),
                                 "--name", name], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        save_pid(home, f"mock-{name}", proc.pid)
    for name, port in DEMO_MOCKS.items():
        deadline = time.monotonic() + 15
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise SystemExit(f"mock upstream {name} did not start on port {port}")
            time.sleep(0.1)


def ray_temp_dir(home: Path) -> str:
    """A short per-gateway Ray temp dir (Unix socket paths are length-limited), so `down` can find
    exactly this gateway's Ray processes and leave any other Ray on the machine alone."""
    import hashlib

    return f"/tmp/trex-ray-{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:10]}"


def start_ray(cmd: list[str], env: dict[str, str]) -> tuple[int, str, int]:
    """Run `ray start` in a session of its own: every process of this Ray (GCS, raylet, the Ray
    client server, workers, Serve's HAProxy) inherits that session, whoever their parent is, so
    `down` can find all of them. Returns (exit code, output, session id)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = proc.communicate()
    return proc.returncode, out, proc.pid


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _ray_processes(home: Path) -> Callable[[psutil.Process, str], bool]:
    """A test for "this process belongs to this gateway's Ray", and to no other Ray on the machine."""
    marker = ray_temp_dir(home)
    gateway = json.loads((home / "gateway.json").read_text()) if (home / "gateway.json").exists() else {}
    session = gateway.get("ray_session")
    if session and not any(marker in " ".join(p.info["cmdline"] or []) and _session_of(p.pid) == session
                           for p in psutil.process_iter(["cmdline"])):
        # The session id is trusted only while Ray's own processes still lead back to it: once they
        # are all gone the number may belong to anything.
        session = None
    gcs_address = f":{gateway['ray_port']}" if gateway.get("ray_port") else None

    def ours(proc: psutil.Process, cmd: str) -> bool:
        if marker in cmd:
            return True
        if session and _session_of(proc.pid) == session:
            return True
        # The Ray client server names only the GCS address (a gateway started before sessions were
        # recorded has nothing else to find it by).
        if gcs_address and "ray.util.client.server" in cmd and any(
                a.startswith("--address=") and a.endswith(gcs_address) for a in cmd.split()):
            return True
        # Ray retitles its workers ("ray::..."): they are ours if they write into our session's logs.
        return cmd.startswith("ray::") and any(marker in f.path for f in proc.open_files())

    return ours


def stop_ray(home: Path) -> None:
    gateway = json.loads((home / "gateway.json").read_text()) if (home / "gateway.json").exists() else {}
    http_port = gateway.get("http_port")
    ours = _ray_processes(home)
    victims = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid == os.getpid():
                continue
            if ours(proc, cmd):
                victims.append(proc)
            elif "haproxy" in (proc.info["name"] or "") and http_port and any(
                    c.laddr and c.laddr.port == http_port and c.status == psutil.CONN_LISTEN
                    for c in proc.net_connections(kind="tcp")):
                # Serve runs HAProxy in its own session: it outlives Ray unless stopped by port.
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in victims:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    # Workers die with their raylet; give them a moment, then sweep what is left of this session.
    time.sleep(0.5)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and ours(proc, " ".join(proc.info["cmdline"] or [])):
                proc.kill()
                left.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(left, timeout=5)
