"""What a Unix socket would save on a same-node hop, against TCP loopback (issue 29):

    .venv/bin/python scripts/bench_sockets.py [--round-trips 20000] [--connections 32 1] [--repeat 3]

Two processes on uvloop, as an ingress and a pool replica are: the client sends a 700-byte request,
the server answers 900 bytes, over N connections at once; each side's CPU microseconds per round
trip (user + system) and round trips per second, TCP and Unix alternately. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import psutil
import uvloop

REQUEST, ANSWER = b"q" * 700, b"a" * 900


async def serve(kind: str, address: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            writer.write(ANSWER)

    if kind == "tcp":
        await asyncio.start_server(handle, "127.0.0.1", int(address))
    else:
        await asyncio.start_unix_server(handle, address)
    await asyncio.Event().wait()


async def drive(kind: str, address: str, total: int, connections: int) -> tuple[float, float]:
    async def one(n: int) -> None:
        if kind == "tcp":
            reader, writer = await asyncio.open_connection("127.0.0.1", int(address))
        else:
            reader, writer = await asyncio.open_unix_connection(address)
        for _ in range(n):
            writer.write(REQUEST)
            got = 0
            while got < len(ANSWER):
                got += len(await reader.read(65536))
        writer.close()

    await one(10)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(total // connections) for _ in range(connections)))
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        uvloop.run(serve(sys.argv[2], sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--connections", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from trex_serve.local.embedded import free_port

    folder = tempfile.mkdtemp(prefix="trex-sockets-")
    print(f"{'socket':6} {'conns':>5} {'round trips/s':>14} {'client µs CPU':>14} {'server µs CPU':>14}")
    for connections in args.connections:
        for _ in range(args.repeat):
            for kind in ("tcp", "unix"):
                address = str(free_port()) if kind == "tcp" else os.path.join(folder, f"s{time.time_ns()}.sock")
                server = subprocess.Popen([sys.executable, __file__, "--serve", kind, address])
                time.sleep(0.7)
                before = sum(psutil.Process(server.pid).cpu_times()[:2])
                wall, client_cpu = uvloop.run(drive(kind, address, args.round_trips, connections))
                server_cpu = sum(psutil.Process(server.pid).cpu_times()[:2]) - before
                server.kill()
                server.wait()
                n = args.round_trips
                print(f"{kind:6} {connections:5d} {n / wall:14.0f} {1e6 * client_cpu / n:14.1f} "
                      f"{1e6 * server_cpu / n:14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
