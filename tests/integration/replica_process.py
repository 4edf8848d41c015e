"""One gateway replica in its own OS process (the standalone wiring served by uvicorn), so a test can
SIGKILL it the way an OOM kill or a lost node would."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

from trex_serve.local.embedded import free_port, port_open


class ReplicaProcess:
    def __init__(self, catalog: str, database_url: str, redis_url: str, prefix: str,
                 claim_idle_ms: int = 15_000) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.replica_process", "--port", str(self.port),
             "--catalog", catalog, "--database-url", database_url, "--redis-url", redis_url,
             "--prefix", prefix, "--claim-idle-ms", str(claim_idle_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.kill()
                raise RuntimeError(f"replica did not start: {err[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, whatever the process held in memory is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


async def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from trex_serve.catalog import load_catalog
    from trex_serve.local.standalone import standalone_gateway
    from trex_serve.settings import Settings

    settings = Settings(catalog_path="", database_url=args.database_url, redis_url=args.redis_url,
                        admin_token="op", secret_key="test-secret", stream_claim_idle_ms=args.claim_idle_ms)
    async with standalone_gateway(settings, load_catalog(args.catalog), counters_prefix=args.prefix) as gw:
        server = uvicorn.Server(uvicorn.Config(gw.app, host="127.0.0.1", port=args.port, log_level="warning",
                                               lifespan="off"))
        await server.serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("--catalog", "--database-url", "--redis-url", "--prefix"):
        parser.add_argument(name, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--claim-idle-ms", type=int, default=15_000)
    asyncio.run(_serve(parser.parse_args()))
