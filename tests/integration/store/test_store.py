"""The repository against both SQLite (a temp file) and PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from trex_serve.errors import Conflict, InvalidRequest, NotFound
from trex_serve.store import Repository, create_engine, migrate
from trex_serve.store.database import current_revision, head_revision
from trex_serve.store.models import metadata

PLANS = [
    {"name": "free", "rpm": 60, "tpm": 100000, "concurrency": 4},
    {"name": "pro", "rpm": 600, "tpm": 1000000, "concurrency": 16, "premium": True},
]
SECRET = "test-secret"


def _fresh_pg_engine(postgres_url: str) -> tuple[sa.Engine, Callable[[], None]]:
    name = f"trex_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(make_url(postgres_url).set(database=name).render_as_string(hide_password=False),
                           pool_size=2, max_overflow=4)

    def drop() -> None:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return engine, drop


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        eng = create_engine(f"sqlite:///{tmp_path / 'trex.db'}")
        drop = eng.dispose
    else:
        eng, drop = _fresh_pg_engine(request.getfixturevalue("postgres_url"))
    migrate(eng)
    yield eng
    drop()


@pytest.fixture
def repo(engine) -> Repository:
    r = Repository(engine, SECRET)
    r.sync_plans(PLANS)
    return r


def _log(account_id: str, request_id: str, when: datetime, **extra) -> dict:
    row = {
        "request_id": request_id, "account_id": account_id, "key_id": extra.pop("key_id", "key_a"),
        "key_prefix": "trex-abcdefg", "created_at": when, "model_requested": "gpt-4o-mini",
        "provider": "openai", "model_served": "gpt-4o-mini", "attempts": 1, "status": 200,
        "latency_ms": 12.5, "ttfb_ms": 3.0, "tokens_in": 10, "tokens_out": 20, "billing": "quota",
        "credits_charged": 0, "stream": False,
    }
    row.update(extra)
    return row


# ------------------------------------------------------------------ migrations


def test_migrations_idempotent_and_match_models(engine):
    assert migrate(engine) == head_revision() == current_revision(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_replicas_migrating_together(backend, request, tmp_path):
    if backend == "sqlite":
        eng, drop = create_engine(f"sqlite:///{tmp_path / 'race.db'}"), None
    else:
        eng, drop = _fresh_pg_engine(request.getfixturevalue("postgres_url"))
    errors: list[Exception] = []

    def worker() -> None:
        try:
            migrate(eng)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and current_revision(eng) == head_revision()
    finally:
        (drop or eng.dispose)()


# ------------------------------------------------------------------ accounts and keys


def test_account_create_update_and_unknown_plan(repo):
    acc = repo.create_account("Acme", "free")
    assert acc["id"].startswith("acc_") and acc["owner_token"].startswith("trexo-")
    assert acc["state"] == "active" and acc["subscription_state"] == "active"
    assert repo.lookup_owner_token(acc["owner_token"]) == acc["id"]
    assert repo.lookup_owner_token("trexo-nope") is None
    assert "owner_token" not in repo.get_account(acc["id"])

    with pytest.raises(InvalidRequest) as err:
        repo.create_account("Bad", "platinum")
    assert err.value.param == "plan"
    with pytest.raises(InvalidRequest):
        repo.update_account(acc["id"], plan="platinum")
    with pytest.raises(NotFound):
        repo.update_account("acc_missing", state="suspended")

    grace = datetime.now(UTC) + timedelta(days=3)
    before, after = repo.update_account(acc["id"], plan="pro", subscription_state="past_due",
                                       grace_until=grace, risk={"allowed_ips": ["10.1.2.3/8"]})
    assert before["plan"] == "free" and after["plan"] == "pro"
    assert after["risk"] == {"allowed_ips": ["10.0.0.0/8"]}
    got = repo.get_account(acc["id"])
    assert got["subscription_state"] == "past_due" and got["grace_until"].startswith(grace.date().isoformat())
    assert [a["id"] for a in repo.list_accounts()] == [acc["id"]]
    actions = [a["action"] for a in repo.list_audit(10)]
    assert actions == ["account.update", "account.create"]
    # nothing half-written on a validation error
    with pytest.raises(InvalidRequest):
        repo.update_account(acc["id"], state="suspended", subscription_state="bogus")
    assert repo.get_account(acc["id"])["state"] == "active"


def test_key_create_lookup_revoke(repo):
    acc = repo.create_account("Acme", "free")
    key, plaintext = repo.create_key(acc["id"], name="ci", limits={"rpm": 5, "tpm": None},
                                     models=["gpt-4o-mini"], risk={"max_output_tokens": 100})
    assert key["id"].startswith("key_") and plaintext.startswith("trex-")
    assert key["prefix"] == plaintext[:12]
    assert key["limits"] == {"rpm": 5}
    assert "key_hash" not in key and plaintext not in str(key)

    ctx = repo.lookup_key(plaintext)
    assert ctx is not None
    assert (ctx.key_id, ctx.account_id, ctx.state, ctx.plan) == (key["id"], acc["id"], "active", "free")
    assert ctx.limits == {"rpm": 5} and ctx.models == ("gpt-4o-mini",)
    assert ctx.risk == {"max_output_tokens": 100} and ctx.billing_policy == "reject"
    assert ctx.account_state == "active" and ctx.bound_providers == frozenset()
    assert not ctx.expired()
    assert repo.lookup_key(plaintext + "x") is None and repo.lookup_key("") is None

    # the raw table holds the hash, never the key
    with repo.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_hash, prefix FROM api_keys")).one()
    assert plaintext not in stored[0] and len(stored[0]) == 64

    repo.update_key(key["id"], state="suspended")
    assert repo.lookup_key(plaintext).state == "suspended"
    repo.update_key(key["id"], state="active")
    repo.update_account(acc["id"], state="suspended")
    assert repo.lookup_key(plaintext).account_state == "suspended"
    after = repo.revoke_key(key["id"])
    assert after["state"] == "revoked" and repo.lookup_key(plaintext).state == "revoked"
    with pytest.raises(Conflict):
        repo.update_key(key["id"], state="active")
    with pytest.raises(NotFound):
        repo.update_key("key_missing", state="inactive")
    with pytest.raises(NotFound):
        repo.create_key("acc_missing")
    with pytest.raises(InvalidRequest) as err:
        repo.create_key(acc["id"], limits={"rpm": -1})
    assert err.value.param == "limits.rpm"
    with pytest.raises(InvalidRequest) as err:
        repo.create_key(acc["id"], risk={"allowed_ips": ["not-an-ip"]})
    assert err.value.param.startswith("risk.allowed_ips")
    assert [k["id"] for k in repo.list_keys(acc["id"])] == [key["id"]]


def test_key_expiry(repo):
    acc = repo.create_account("Acme", "free")
    past = datetime.now(UTC) - timedelta(seconds=1)
    _, expired_key = repo.create_key(acc["id"], expires_at=past)
    _, live_key = repo.create_key(acc["id"], expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    ctx = repo.lookup_key(expired_key)
    assert ctx.expires_at.tzinfo is not None and ctx.expired()
    assert not repo.lookup_key(live_key).expired()
    assert repo.lookup_key(live_key).expired(datetime.now(UTC) + timedelta(hours=2))


def test_auto_suspend_writes_risk_event(repo):
    acc = repo.create_account("Acme", "free")
    key, plaintext = repo.create_key(acc["id"])
    assert repo.auto_suspend_key(key["id"], detail={"window_s": 60, "spent": 5.0})
    assert not repo.auto_suspend_key(key["id"])  # already suspended: no second event
    assert repo.lookup_key(plaintext).state == "suspended"
    events = repo.list_risk_events(acc["id"], 10)
    assert [e["kind"] for e in events] == ["auto_suspended"] and events[0]["key_id"] == key["id"]
    repo.add_risk_event(acc["id"], "spend_alert", key["id"], {"cap": "daily"})
    assert [e["kind"] for e in repo.list_risk_events(acc["id"], 10)] == ["spend_alert", "auto_suspended"]
    assert repo.list_audit(1)[0]["actor"] == "risk"


# ------------------------------------------------------------------ bindings


def test_binding_encrypted_at_rest_and_scoped(repo):
    acc = repo.create_account("Acme", "free")
    k1, p1 = repo.create_key(acc["id"])
    k2, p2 = repo.create_key(acc["id"])
    secret = "sk-proj-SUPERSECRET1234567890abcd"
    masked = repo.put_binding(acc["id"], "openai", secret)
    assert masked["api_key"] == "sk-…abcd" and secret not in str(masked)
    with repo.engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT encrypted_key FROM provider_bindings")).scalar_one()
    assert secret not in raw and "SUPERSECRET" not in raw
    assert repo.binding_secret(acc["id"], k1["id"], "openai") == secret
    assert repo.binding_secret(acc["id"], k1["id"], "anthropic") is None
    assert repo.lookup_key(p1).bound_providers == {"openai"}

    # upsert, restricted to k2 only
    repo.put_binding(acc["id"], "openai", "sk-other-0000000000wxyz", key_ids=[k2["id"]])
    repo.put_binding(acc["id"], "openrouter", "sk-or-v1-1111111111111111")
    assert len(repo.list_bindings(acc["id"])) == 2
    assert repo.binding_secret(acc["id"], k1["id"], "openai") is None
    assert repo.binding_secret(acc["id"], k2["id"], "openai") == "sk-other-0000000000wxyz"
    assert repo.lookup_key(p1).bound_providers == {"openrouter"}
    assert repo.lookup_key(p2).bound_providers == {"openai", "openrouter"}
    with pytest.raises(InvalidRequest):
        repo.put_binding(acc["id"], "openai", "sk-x", key_ids=["key_not_mine"])

    # audit rows never contain the secret
    audit = str(repo.list_audit(50))
    assert secret not in audit and "sk-other-0000000000wxyz" not in audit and "encrypted_key" not in audit

    repo.delete_binding(acc["id"], "openrouter")
    assert repo.lookup_key(p2).bound_providers == {"openai"}
    with pytest.raises(NotFound):
        repo.delete_binding(acc["id"], "openrouter")


def test_secret_rotation(engine):
    old = Repository(engine, "old-secret")
    old.sync_plans(PLANS)
    acc = old.create_account("Acme", "free")
    old.put_binding(acc["id"], "openai", "sk-rotate-me-123456")
    rotated = Repository(engine, "new-secret,old-secret")
    assert rotated.binding_secret(acc["id"], None, "openai") == "sk-rotate-me-123456"
    assert rotated.rotate_bindings() == 1
    new_only = Repository(engine, "new-secret")
    assert new_only.binding_secret(acc["id"], None, "openai") == "sk-rotate-me-123456"


# ------------------------------------------------------------------ ledger


def test_ledger_idempotent_and_sums(repo):
    a = repo.create_account("A", "free")["id"]
    b = repo.create_account("B", "free")["id"]
    row = repo.grant_credits(a, 10_000_000, "welcome")
    assert row["kind"] == "grant" and row["amount_micro"] == 10_000_000 and row["amount"] == 10.0
    with pytest.raises(InvalidRequest):
        repo.grant_credits(a, 0, "zero")
    with pytest.raises(NotFound):
        repo.grant_credits("acc_missing", 5, "x")

    batch = [
        {"account_id": a, "key_id": "k", "request_id": "req_1", "kind": "charge", "amount": 1_500_000},
        {"account_id": a, "key_id": "k", "request_id": "req_2", "kind": "charge", "amount": -250_000},
        {"account_id": a, "key_id": "k", "request_id": "req_2", "kind": "refund", "amount": 50_000},
        {"account_id": b, "request_id": "req_3", "kind": "charge", "amount": 1},
    ]
    repo.append_ledger(batch)
    repo.append_ledger(batch)  # a retried batch never double-writes
    repo.append_ledger(batch[:1] + batch[:1])  # duplicates inside one batch too
    repo.append_ledger([])
    repo.append_ledger([{"account_id": a, "kind": "bogus", "amount": 5}])  # skipped, never fatal
    assert repo.ledger_sum(a) == 10_000_000 - 1_500_000 - 250_000 + 50_000
    assert repo.ledger_totals(a) == {
        "granted": 10_000_000, "charged": 1_750_000, "refunded": 50_000, "adjusted": 0,
        "balance": 8_300_000,
    }
    assert repo.all_balances() == {a: 8_300_000, b: -1}
    assert repo.ledger_sum("acc_none") == 0
    assert [r["kind"] for r in repo.list_ledger(a, 2)][0] in ("charge", "refund")


def test_ledger_concurrent_duplicate_batches(repo):
    a = repo.create_account("A", "free")["id"]
    batch = [{"account_id": a, "request_id": f"req_{i}", "kind": "charge", "amount": 10} for i in range(50)]
    errors = []

    def worker():
        try:
            repo.append_ledger(batch)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert repo.ledger_sum(a) == -500


def _stored_ledger(request_id: str | None, account_id: str, kind: str, amount: int, created_at: str,
                   **extra) -> dict:
    row = {"id": None, "account_id": account_id, "key_id": None, "request_id": request_id, "kind": kind,
           "amount_micro": amount, "amount": amount / 1_000_000, "reason": None, "tokens": None,
           "created_at": created_at}
    row.update(extra)
    return row


def test_append_ledger_stores_every_column_form(repo, engine, caplog):
    """Pins what a ledger row becomes (the money path), column by column, on both databases: the
    sign of ``amount`` fixed by kind and bigints kept whole; timestamps as aware or naive datetimes,
    epoch seconds or ISO text (stored in UTC), absent meaning the time of writing; over-long or
    non-text values clipped to their column; ``tokens`` JSON, absent or None; unknown keys ignored;
    a (request_id, kind) already written, in the same batch or an earlier one, skipped, while rows
    without a request_id are all kept; rows that cannot be converted logged and skipped."""
    a = repo.create_account("A", "free")["id"]
    b = repo.create_account("B", "free")["id"]
    full = {"account_id": a, "key_id": "key_1", "request_id": "req_full", "kind": "charge", "amount": 1_500_000,
            "reason": "chat gpt-4o", "tokens": {"input": 1000, "output": 200, "cache_read": 100},
            "created_at": datetime(2025, 3, 4, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
            "id": 999, "unknown": "ignored"}
    epoch = {"account_id": a, "request_id": "req_epoch", "kind": "charge", "amount": -250_000,
             "created_at": 1735689600.25, "tokens": None, "key_id": None, "reason": None}
    refund = {"account_id": a, "request_id": "req_epoch", "kind": "refund", "amount": -50_000,
              "created_at": "2025-01-02T03:04:05Z", "tokens": {}}
    grant_1 = {"account_id": a, "kind": "grant", "amount": "2000000", "created_at": datetime(2025, 1, 3)}
    grant_2 = {"account_id": a, "kind": "grant", "amount": 2_000_000, "created_at": datetime(2025, 1, 3),
               "request_id": None}
    adjust = {"account_id": a, "request_id": "req_adjust", "kind": "adjust", "amount": -7.9,
              "created_at": "2025-01-02T05:04:05.5+02:00", "tokens": [1, "two", None]}
    adjust_none = {"account_id": a, "request_id": "req_adjust_none", "kind": "adjust", "amount": None,
                   "created_at": datetime(2025, 1, 1, 12, tzinfo=UTC)}
    big = {"account_id": b, "request_id": "req_big", "kind": "charge", "amount": 5_000_000_000_000,
           "created_at": datetime(2025, 1, 5, tzinfo=UTC), "tokens": {"output": 2**40}}
    long = {"account_id": b, "key_id": "i" * 70, "request_id": "r" * 200, "kind": "refund", "amount": 3,
            "reason": "x" * 600, "created_at": datetime(2025, 1, 6, tzinfo=UTC)}
    not_text = {"account_id": b, "key_id": 12345, "request_id": 678, "kind": "charge", "amount": 1,
                "reason": 9.5, "created_at": datetime(2025, 1, 7, tzinfo=UTC)}
    same_batch_dup = dict(full, amount=999, reason="duplicate")
    bad = [{"account_id": a, "request_id": "bad_kind", "kind": "bogus", "amount": 5},
           {"account_id": a, "request_id": "no_kind", "amount": 5},
           {"account_id": a, "request_id": "bad_amount", "kind": "charge", "amount": "abc"},
           {"account_id": a, "request_id": "list_amount", "kind": "charge", "amount": [1]},
           {"account_id": a, "request_id": "bad_time", "kind": "charge", "amount": 5, "created_at": "not a time"}]
    no_time = {"account_id": b, "request_id": "req_now", "kind": "charge", "amount": 10}
    before = datetime.now(UTC)
    with caplog.at_level("ERROR", logger="trex.store"):
        repo.append_ledger([full, bad[0], epoch, refund, grant_1, grant_2, adjust, adjust_none, bad[1], big,
                            long, not_text, same_batch_dup, bad[2], bad[3], no_time, bad[4]])
    after = datetime.now(UTC)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ledger row skipped")]
    assert len(skipped) == len(bad)
    assert all(f"'{row['request_id']}'" in msg for row, msg in zip(bad, skipped, strict=True))
    # A retried batch writes nothing again; a new row in it is written; rows without a request_id
    # are not deduplicated (NULLs are distinct in the unique key).
    repo.append_ledger([dict(full, amount=1), dict(refund, amount=1), dict(big, kind="refund", amount=4),
                        dict(grant_2, created_at=datetime(2025, 1, 8, tzinfo=UTC))])
    repo.append_ledger([])
    repo.append_ledger(bad)  # nothing to write
    # A row without an account is not skipped: the whole batch fails and writes nothing, so the
    # drainer keeps it pending rather than losing the other rows' money.
    with pytest.raises(sa.exc.SQLAlchemyError):
        repo.append_ledger([dict(no_time, request_id="req_lost"), {"kind": "grant", "amount": 1}])

    assert repo.ledger_sum(a) == -1_500_000 - 250_000 + 50_000 + 3 * 2_000_000 - 7
    assert repo.ledger_totals(a) == {"granted": 6_000_000, "charged": 1_750_000, "refunded": 50_000,
                                     "adjusted": -7, "balance": 4_299_993}
    assert repo.ledger_sum(b) == -5_000_000_000_000 + 3 - 1 - 10 + 4
    assert repo.ledger_totals(b) == {"granted": 0, "charged": 5_000_000_000_011, "refunded": 7,
                                     "adjusted": 0, "balance": -5_000_000_000_004}
    assert repo.all_balances() == {a: 4_299_993, b: -5_000_000_000_004}

    rows_b = [dict(r, id=None) for r in repo.list_ledger(b, 100)]
    now = rows_b.pop(0)
    assert before <= datetime.fromisoformat(now.pop("created_at")) <= after
    assert now == {k: v for k, v in _stored_ledger("req_now", b, "charge", -10, "").items() if k != "created_at"}
    assert rows_b == [
        _stored_ledger("678", b, "charge", -1, "2025-01-07T00:00:00Z", key_id="12345", reason="9.5"),
        _stored_ledger("r" * 128, b, "refund", 3, "2025-01-06T00:00:00Z", key_id="i" * 64, reason="x" * 500),
        _stored_ledger("req_big", b, "refund", 4, "2025-01-05T00:00:00Z", tokens={"output": 2**40}),
        _stored_ledger("req_big", b, "charge", -5_000_000_000_000, "2025-01-05T00:00:00Z",
                       tokens={"output": 2**40}),
    ]
    assert [dict(r, id=None) for r in repo.list_ledger(a, 100)] == [
        _stored_ledger("req_full", a, "charge", -1_500_000, "2025-03-04T05:08:09.123456Z", key_id="key_1",
                       reason="chat gpt-4o", tokens={"input": 1000, "output": 200, "cache_read": 100}),
        _stored_ledger(None, a, "grant", 2_000_000, "2025-01-08T00:00:00Z"),
        _stored_ledger(None, a, "grant", 2_000_000, "2025-01-03T00:00:00Z"),
        _stored_ledger(None, a, "grant", 2_000_000, "2025-01-03T00:00:00Z"),
        _stored_ledger("req_adjust", a, "adjust", -7, "2025-01-02T03:04:05.500000Z", tokens=[1, "two", None]),
        _stored_ledger("req_epoch", a, "refund", 50_000, "2025-01-02T03:04:05Z", tokens={}),
        _stored_ledger("req_adjust_none", a, "adjust", 0, "2025-01-01T12:00:00Z"),
        _stored_ledger("req_epoch", a, "charge", -250_000, "2025-01-01T00:00:00.250000Z"),
    ]

    # What the tables hold: SQLite timestamps as UTC text without an offset, PostgreSQL timestamptz;
    # amount a 64-bit integer; ``tokens`` JSON text, and None stored as JSON null, not SQL NULL.
    with engine.connect() as conn:
        stored = sorted(conn.exec_driver_sql(
            "SELECT request_id, kind, amount, created_at, CAST(tokens AS TEXT), tokens IS NULL FROM ledger"
            " WHERE request_id IS NOT NULL AND request_id != 'req_now'").all(), key=lambda r: (r[0], r[1]))
    long_id, full_tokens = "r" * 128, '{"input": 1000, "output": 200, "cache_read": 100}'
    expected = [  # request_id, kind, amount, created_at (as SQLite text), tokens as text, tokens IS NULL
        ("678", "charge", -1, "2025-01-07 00:00:00.000000", "null"),
        ("req_adjust", "adjust", -7, "2025-01-02 03:04:05.500000", '[1, "two", null]'),
        ("req_adjust_none", "adjust", 0, "2025-01-01 12:00:00.000000", "null"),
        ("req_big", "charge", -5_000_000_000_000, "2025-01-05 00:00:00.000000", '{"output": 1099511627776}'),
        ("req_big", "refund", 4, "2025-01-05 00:00:00.000000", '{"output": 1099511627776}'),
        ("req_epoch", "charge", -250_000, "2025-01-01 00:00:00.250000", "null"),
        ("req_epoch", "refund", 50_000, "2025-01-02 03:04:05.000000", "{}"),
        ("req_full", "charge", -1_500_000, "2025-03-04 05:08:09.123456", full_tokens),
        (long_id, "refund", 3, "2025-01-06 00:00:00.000000", "null"),
    ]
    if engine.dialect.name == "sqlite":
        assert [tuple(r) for r in stored] == [(*row, 0) for row in expected]
    else:
        assert [tuple(r) for r in stored] == [
            (rid, kind, amount, datetime.fromisoformat(when).replace(tzinfo=UTC), tokens, False)
            for rid, kind, amount, when, tokens in expected]
        assert all(type(r[2]) is int for r in stored)


# ------------------------------------------------------------------ request logs


def test_logs_query_filters_paging_and_purge(repo):
    a = repo.create_account("A", "free")["id"]
    b = repo.create_account("B", "free")["id"]
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    rows = [_log(a, f"req_{i:02d}", t0 + timedelta(seconds=i)) for i in range(10)]
    rows[3].update(status=429, error_code="rate_limit_exceeded")
    rows[7].update(status=502, error_code="upstream_unavailable", model_served=None, provider=None)
    rows[5].update(model_requested="smart-auto", model_served="llama-3", key_id="key_b")
    rows.append(_log(b, "req_b", t0))
    repo.insert_logs(rows)
    repo.insert_logs(rows[:2])  # idempotent on request_id

    newest = repo.query_logs(a, limit=3)
    assert [r["request_id"] for r in newest] == ["req_09", "req_08", "req_07"]
    assert newest[0]["created_at"].startswith("2025-01-01T00:00:09")
    page2 = repo.query_logs(a, limit=3, before=newest[-1]["request_id"])
    assert [r["request_id"] for r in page2] == ["req_06", "req_05", "req_04"]
    by_time = repo.query_logs(a, limit=2, before=(t0 + timedelta(seconds=2)).isoformat())
    assert [r["request_id"] for r in by_time] == ["req_01", "req_00"]
    assert [r["request_id"] for r in repo.query_logs(a, status=429)] == ["req_03"]
    assert [r["request_id"] for r in repo.query_logs(a, status="error")] == ["req_07", "req_03"]
    assert [r["request_id"] for r in repo.query_logs(a, status="5xx")] == ["req_07"]
    assert [r["request_id"] for r in repo.query_logs(a, model="llama-3")] == ["req_05"]
    assert [r["request_id"] for r in repo.query_logs(a, model="smart-auto")] == ["req_05"]
    assert [r["request_id"] for r in repo.query_logs(a, key_id="key_b")] == ["req_05"]
    assert len(repo.query_logs(a, since=t0 + timedelta(seconds=8))) == 2
    assert len(repo.query_logs(a, limit=100)) == 10
    assert [r["request_id"] for r in repo.query_logs(b)] == ["req_b"]
    with pytest.raises(InvalidRequest):
        repo.query_logs(a, status="weird")

    assert repo.purge_logs(t0 + timedelta(seconds=5)) == 6  # req_00..04 and req_b
    assert len(repo.query_logs(a, limit=100)) == 5


def test_log_content_only_when_opted_in(repo):
    a = repo.create_account("A", "free")["id"]
    b = repo.create_account("B", "free", log_content=True)["id"]
    now = datetime.now(UTC)
    repo.insert_logs([
        _log(a, "req_a", now, prompt_text="hello", completion_text="world"),
        _log(b, "req_b", now, prompt_text="hello", completion_text="world"),
    ])
    assert repo.query_logs(a)[0]["prompt_text"] is None
    assert repo.query_logs(b)[0]["completion_text"] == "world"


def test_sync_plans_mirrors_catalog(repo):
    repo.sync_plans([{"name": "free", "rpm": 30}])
    assert repo.list_plans() == [{"name": "free", "rpm": 30}]
    assert repo.default_plan() == "free"


def test_insert_logs_accepts_request_records(repo):
    from trex_serve.observability.request_record import RequestRecord

    a = repo.create_account("A", "free")["id"]
    rec = RequestRecord(
        request_id="req_rec", api="chat", account_id=a, key_id="key_x", key_prefix="trex-abcdefg",
        model_requested="gpt-4o-mini", provider="openai", model_served="gpt-4o-mini", attempts=2,
        fallbacks=1, status=200, error_code=None, latency_ms=10.0, ttfb_ms=2.0, tokens_in=3,
        tokens_out=4, billing="credits", credits_charged=1234, stream=True, client_ip="127.0.0.1",
    )
    anonymous = dict(rec.row(), request_id="req_anon", account_id=None, status=401)
    odd = dict(rec.row(), request_id="req_odd", model_requested="m" * 5000, error_code="e" * 200,
               created_at="not a time")
    repo.insert_logs([rec.row(), anonymous, odd])
    assert len(repo.query_logs(a, model="m" * 256)) == 1
    rows = [r for r in repo.query_logs(a) if r["request_id"] != "req_odd"]
    assert [r["request_id"] for r in rows] == ["req_rec"]
    assert rows[0]["stream"] is True and rows[0]["credits_charged_micro"] == 1234 and rows[0]["attempts"] == 2
    assert abs(datetime.fromisoformat(rows[0]["created_at"]).timestamp() - rec.created_at) < 0.01


def _stored_log(request_id: str, account_id: str, created_at: str, **extra) -> dict:
    """What ``query_logs`` returns for a row that set only ``extra`` (the defaults otherwise)."""
    row = {
        "id": None, "request_id": request_id, "account_id": account_id, "key_id": None, "key_prefix": None,
        "created_at": created_at, "api": None, "model_requested": None, "provider": None, "model_served": None,
        "attempts": 0, "status": 0, "error_code": None, "latency_ms": 0.0, "ttfb_ms": None, "tokens_in": 0,
        "tokens_out": 0, "tokens": {"input": 0, "cache_read": 0, "cache_write": 0, "cache_write_1h": 0,
                                    "output": 0, "reasoning": 0},
        "billing": None, "credits_charged_micro": 0, "credits_charged": 0.0, "stream": False, "cache": None,
        "prompt_text": None, "completion_text": None,
    }
    row.update(extra)
    return row


def test_insert_logs_stores_every_column_type(repo, engine):
    """Pins what a log row becomes, column by column, on both databases: timestamps given as aware
    or naive datetimes, epoch seconds or ISO text (stored in UTC), None taking the column defaults,
    over-long or non-text values clipped to their column, unknown keys ignored, prompt/completion
    text kept only for an opted-in account, and a request_id already written (in the same batch or
    an earlier one) skipped."""
    a = repo.create_account("A", "free")["id"]
    b = repo.create_account("B", "free", log_content=True)["id"]
    full = {
        "request_id": "req_full", "account_id": b, "key_id": "key_1", "key_prefix": "trex-abcdefg",
        "created_at": datetime(2025, 3, 4, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
        "api": "chat", "model_requested": "gpt-4o", "provider": "openai", "model_served": "gpt-4o-2024",
        "attempts": 3, "status": 200, "error_code": None, "latency_ms": 12.5, "ttfb_ms": 3.25, "tokens_in": 1000,
        "tokens_out": 200, "tokens_cache_read": 100, "tokens_cache_write": 50, "tokens_cache_write_1h": 25,
        "tokens_reasoning": 40, "billing": "credits", "credits_charged": 5_000_000_000, "stream": True,
        "cache": "hit", "prompt_text": "p" * 10000, "completion_text": "done",
        "attempt_detail": [{"provider": "openai", "status": 200}], "fallbacks": 1, "client_ip": "10.0.0.1",
    }
    epoch = {"request_id": "req_epoch", "account_id": a, "created_at": 1735689600.25, "stream": False,
             "attempts": None, "status": None, "latency_ms": None, "ttfb_ms": None, "tokens_in": None,
             "tokens_out": None, "credits_charged": None, "key_id": None, "api": None,
             "prompt_text": "secret", "completion_text": None, "attempt_detail": []}
    iso = {"request_id": "req_iso", "account_id": a, "created_at": "2025-01-02T03:04:05Z", "stream": None,
           "latency_ms": 7}
    iso_offset = {"request_id": "req_iso_offset", "account_id": a, "created_at": "2025-01-02T05:04:05.5+02:00",
                  "completion_text": "not opted in"}
    naive = {"request_id": "req_naive", "account_id": a, "created_at": datetime(2025, 1, 3)}
    long = {"request_id": "req_long", "account_id": a, "created_at": datetime(2025, 1, 4, tzinfo=UTC),
            "model_requested": "m" * 5000, "model_served": "s" * 300, "error_code": "e" * 200,
            "key_prefix": "k" * 100, "key_id": "i" * 70, "api": "a" * 40, "provider": 12345, "billing": "b" * 30,
            "cache": "c" * 20, "status": 502}
    same_batch_dup = {"request_id": "req_iso", "account_id": a, "created_at": "2026-01-01T00:00:00Z", "status": 418}
    skipped = [{"request_id": "req_anon", "account_id": None}, {"request_id": "", "account_id": a},
               {"account_id": a}]
    before = datetime.now(UTC)
    repo.insert_logs([full, epoch, iso, iso_offset, naive, long, same_batch_dup, *skipped,
                      {"request_id": "req_bad_time", "account_id": a, "created_at": "not a time"}])
    after = datetime.now(UTC)
    repo.insert_logs([dict(full, status=500, completion_text="changed"), dict(epoch, status=201)])  # both skipped
    repo.insert_logs(skipped)  # nothing to write

    [stored_b] = repo.query_logs(b)
    assert dict(stored_b, id=None) == _stored_log(
        "req_full", b, "2025-03-04T05:08:09.123456Z", key_id="key_1", key_prefix="trex-abcdefg",
        api="chat", model_requested="gpt-4o", provider="openai", model_served="gpt-4o-2024", attempts=3,
        status=200, latency_ms=12.5, ttfb_ms=3.25, tokens_in=1000, tokens_out=200,
        tokens={"input": 825, "cache_read": 100, "cache_write": 50, "cache_write_1h": 25, "output": 200,
                "reasoning": 40},
        billing="credits", credits_charged_micro=5_000_000_000, credits_charged=5000.0, stream=True, cache="hit",
        prompt_text="p" * 10000, completion_text="done")

    rows = repo.query_logs(a, limit=100)
    bad_time = rows.pop(0)
    assert bad_time["request_id"] == "req_bad_time"  # an unreadable timestamp: the time of writing
    assert before <= datetime.fromisoformat(bad_time["created_at"]) <= after
    assert [dict(r, id=None) for r in rows] == [
        _stored_log("req_long", a, "2025-01-04T00:00:00Z", model_requested="m" * 256, model_served="s" * 256,
                    error_code="e" * 64, key_prefix="k" * 32, key_id="i" * 64, api="a" * 32, provider="12345",
                    billing="b" * 16, cache="c" * 8, status=502),
        _stored_log("req_naive", a, "2025-01-03T00:00:00Z"),
        _stored_log("req_iso_offset", a, "2025-01-02T03:04:05.500000Z"),
        _stored_log("req_iso", a, "2025-01-02T03:04:05Z", latency_ms=7.0),
        _stored_log("req_epoch", a, "2025-01-01T00:00:00.250000Z"),
    ]

    # How the timestamp and the flag are stored: SQLite text in UTC without an offset, 0/1;
    # PostgreSQL timestamptz and boolean.
    with engine.connect() as conn:
        stored = {r[0]: r[1:] for r in conn.exec_driver_sql(
            "SELECT request_id, created_at, stream FROM request_logs WHERE request_id != 'req_bad_time'")}
    if engine.dialect.name == "sqlite":
        assert stored == {
            "req_full": ("2025-03-04 05:08:09.123456", 1), "req_epoch": ("2025-01-01 00:00:00.250000", 0),
            "req_iso": ("2025-01-02 03:04:05.000000", 0), "req_iso_offset": ("2025-01-02 03:04:05.500000", 0),
            "req_naive": ("2025-01-03 00:00:00.000000", 0), "req_long": ("2025-01-04 00:00:00.000000", 0),
        }
    else:
        assert stored == {
            "req_full": (datetime(2025, 3, 4, 5, 8, 9, 123456, tzinfo=UTC), True),
            "req_epoch": (datetime(2025, 1, 1, 0, 0, 0, 250000, tzinfo=UTC), False),
            "req_iso": (datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC), False),
            "req_iso_offset": (datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=UTC), False),
            "req_naive": (datetime(2025, 1, 3, tzinfo=UTC), False),
            "req_long": (datetime(2025, 1, 4, tzinfo=UTC), False),
        }
