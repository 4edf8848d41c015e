"""How long a continued conversation costs the gateway: the read of a ``previous_response_id``'s whole
chain (one recursive query, decrypting every turn), the history it becomes, and storing the new turn,
at chain depths 1, 10, 50 and 200, on SQLite (the embedded default) and PostgreSQL when reachable.

    .venv/bin/python scripts/bench_conversations.py [--rounds 200] [--postgres postgresql://localhost/test]

Prints one row per database and depth: p50 / p95 of the chain read + history build (what a
continued request waits for before admission), and of the store of a turn (after the answer).
Results: docs/STATEFUL.md."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from trex_serve.conversations.service import StoredResponses
from trex_serve.conversations.store import ResponseStore
from trex_serve.store.database import create_engine, migrate

TEXT = "A paragraph of a typical assistant answer, long enough to be realistic. " * 8  # ~600 chars


def _turn_io(n: int) -> tuple[list[dict], dict]:
    inputs = [{"type": "message", "role": "user", "id": f"msg_in{n}", "content": [{"type": "input_text",
                                                                                  "text": f"question {n}"}]}]
    response = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "model": "gpt-4o-mini",
                "output": [{"type": "message", "id": f"msg_out{n}", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": TEXT, "annotations": []}]}],
                "usage": {"input_tokens": 10 * n, "output_tokens": 150, "total_tokens": 10 * n + 150}}
    return inputs, response


async def _chain(stored: StoredResponses, account: str, depth: int) -> str:
    previous = None
    for n in range(depth):
        inputs, response = _turn_io(n)
        await stored.keep(account, "key_bench", f"req_{n}", inputs, response, previous)
        previous = response["id"]
    return previous  # type: ignore[return-value]


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def bench(url: str, label: str, rounds: int, depths: list[int]) -> None:
    engine = create_engine(url)
    migrate(engine)
    stored = StoredResponses(ResponseStore(engine, "bench-secret-key-bench-secret-key"), 30)
    account = f"acc_bench_{uuid.uuid4().hex[:8]}"
    for depth in depths:
        last = await _chain(stored, account, depth)
        reads, writes = [], []
        for i in range(rounds):
            t0 = time.perf_counter()
            history = await stored.history(account, last)
            reads.append((time.perf_counter() - t0) * 1000)
            assert len(history) == 2 * depth
            inputs, response = _turn_io(depth + i)
            t0 = time.perf_counter()
            await stored.keep(account, "key_bench", f"req_w{i}", inputs, response, last)  # a sibling turn
            writes.append((time.perf_counter() - t0) * 1000)
        print(f"| {label} | {depth} | {statistics.median(reads):.2f} | {_pct(reads, .95):.2f} | "
              f"{statistics.median(writes):.2f} | {_pct(writes, .95):.2f} |", flush=True)
    engine.dispose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--depths", default="1,10,50,200")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    print("| database | turns in the chain | read + history p50 ms | p95 ms | store a turn p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(f"sqlite:///{Path(tmp) / 'bench.db'}", "SQLite", args.rounds, depths))
    try:
        asyncio.run(bench(args.postgres, "PostgreSQL", args.rounds, depths))
    except Exception as exc:  # noqa: BLE001 - no PostgreSQL here: say so, the SQLite rows stand
        print(f"(PostgreSQL at {args.postgres} skipped: {type(exc).__name__}: {str(exc)[:120]})")


if __name__ == "__main__":
    main()
