"""A Redis primary, its replicas and three sentinels on loopback: what production runs on several
hosts, started on one machine to try a failover (the tests, the benchmark of durable writes, an
operator rehearsing one). Each replica reaches the primary through a small TCP relay that can be
cut: a network partition that TCP has not noticed, so the primary's last writes never reach a
replica — on loopback a replica is otherwise never behind, and a lost write could not be shown.

    python -m trex_serve.local.sentinel_set --dir /tmp/sentinels      # prints TREX_REDIS_URL, pids

The sentinels use ``down-after-milliseconds 1000`` by default: a killed primary is replaced in
about 2-3 s here."""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis

from trex_serve.local.embedded import free_port, port_open, redis_server_binary

SERVICE = "trex"


class LinkRelay:
    """Forwards connections on a port of its own to ``target_port``. After :meth:`cut` the bytes
    read from either side are dropped (the sockets stay open); a side that closes closes the other."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_cut = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self.is_cut = True

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}

        def drop(sock: socket.socket) -> None:
            for s in (sock, peers.get(sock)):
                if s is not None and s in peers:
                    sel.unregister(s)
                    peers.pop(s, None)
                    s.close()

        while not self._stop:
            for key, _ in sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    client, _ = sock.accept()
                    try:
                        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
                    except OSError:  # the target is gone: refuse as it would
                        client.close()
                        continue
                    peers[client], peers[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    drop(sock)
                elif not self.is_cut:
                    try:
                        peers[sock].sendall(data)
                    except OSError:
                        drop(sock)
        for sock in list(peers):
            sock.close()
        self.listener.close()


class SentinelSet:
    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000,
                 service: str = SERVICE, relay: bool = True) -> None:
        """``relay``: replicas reach the primary through a :class:`LinkRelay` (to cut); without it
        they connect directly (the benchmark: a Python relay would be what it measures)."""
        self.workdir = workdir
        self.relay = relay
        self.n_replicas, self.n_sentinels = replicas, sentinels
        self.down_after_ms = down_after_ms
        self.service = service
        self.procs: dict[int, subprocess.Popen] = {}  # port -> process
        self.relays: list[LinkRelay] = []
        self.primary_port = 0
        self.replica_ports: list[int] = []
        self.sentinel_ports: list[int] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def _server(self, port: int, conf: Path | None, *options: str) -> None:
        home = self.workdir / str(port)
        home.mkdir(parents=True, exist_ok=True)
        log = open(home / "redis.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.procs[port] = subprocess.Popen(
            [redis_server_binary(), *([str(conf)] if conf else []), "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(home), *options], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline or self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} did not start (see {home / 'redis.log'})")
            time.sleep(0.05)

    def start(self) -> SentinelSet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.primary_port = free_port()
        self._server(self.primary_port, None, "--save", "", "--appendonly", "no")
        for _ in range(self.n_replicas):
            upstream = self.primary_port
            if self.relay:
                self.relays.append(LinkRelay(self.primary_port))
                upstream = self.relays[-1].port
            port = free_port()
            self._server(port, None, "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1", str(upstream))
            self.replica_ports.append(port)
        self._wait(lambda: self.connected_replicas(self.primary_port) == self.n_replicas, "replicas in sync")
        for _ in range(self.n_sentinels):
            port = free_port()
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {self.n_sentinels // 2 + 1}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 180000\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            self._server(port, conf, "--sentinel")
            self.sentinel_ports.append(port)
        self._wait(self._sentinels_ready, "sentinels that know every replica and each other")
        return self

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                state = _client(port).sentinel_master(self.service)
            except redis.RedisError:
                return False
            if int(state["num-slaves"]) < self.n_replicas or int(state["num-other-sentinels"]) < self.n_sentinels - 1:
                return False
        return True

    def _wait(self, ready: object, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for relay in self.relays:
            relay.close()

    # -- what a user of the set needs ------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def primary(self) -> int:
        """The primary's port as the sentinels say it now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                _, primary = _client(port).sentinel_get_master_addr_by_name(self.service)
                return int(primary)
        raise RuntimeError("no sentinel answers")

    def connected_replicas(self, port: int) -> int:
        """Replicas attached to the server on ``port`` (its INFO), -1 when it does not answer."""
        try:
            return int(_client(port).info("replication").get("connected_slaves", 0))
        except redis.RedisError:
            return -1

    def cut_replication(self) -> None:
        """From now on nothing the current primary writes reaches a replica."""
        for relay in self.relays:
            relay.cut()

    def kill_primary(self) -> int:
        port = self.primary()
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(timeout=10)
        return port

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> tuple[int, float]:
        """(the promoted replica's port, seconds waited) once the sentinels name it and it says it
        is the primary."""
        t0 = time.monotonic()
        def promoted() -> bool:
            port = self.primary()
            return port != old_port and _client(port).role()[0] in (b"master", "master")
        self._wait(promoted, "the sentinels to promote a replica", timeout)
        return self.primary(), time.monotonic() - t0


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m trex_serve.local.sentinel_set", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="working directory of the servers")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--down-after-ms", type=int, default=1000)
    args = parser.parse_args()
    sset = SentinelSet(args.dir, replicas=args.replicas, down_after_ms=args.down_after_ms).start()
    print(f"TREX_REDIS_URL={sset.url()}", flush=True)
    print(f"primary 127.0.0.1:{sset.primary_port} (pid {sset.procs[sset.primary_port].pid}); replicas "
          + ", ".join(f"{p} (pid {sset.procs[p].pid})" for p in sset.replica_ports)
          + "; sentinels " + ", ".join(str(p) for p in sset.sentinel_ports), flush=True)
    print("Ctrl-C stops them all; SIGUSR1 cuts replication, SIGUSR2 kills the primary", flush=True)
    stop = threading.Event()

    def cut(*_a: object) -> None:
        sset.cut_replication()
        print(f"{time.time():.3f} replication cut", flush=True)

    def failover() -> None:
        old = sset.kill_primary()
        print(f"{time.time():.3f} primary {old} killed", flush=True)
        new, took = sset.wait_failover(old)
        print(f"{time.time():.3f} primary {new} promoted after {took:.2f} s", flush=True)

    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    signal.signal(signal.SIGINT, lambda *_a: stop.set())
    signal.signal(signal.SIGUSR1, cut)
    signal.signal(signal.SIGUSR2, lambda *_a: threading.Thread(target=failover, daemon=True).start())
    while not stop.wait(0.5):
        pass
    sset.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
