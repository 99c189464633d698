"""The integration scenario against the real PostgreSQL server (skips locally if it is down,
fails in CI, where .ci/run makes sure it runs)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from helpers import run_seed_scenario
from sqlalchemy import select

from zmqlab.store import DEAD_LETTERS, RECORDS, Batch, Delivery, Records, Sink

pytestmark = pytest.mark.postgres


def test_seed_scenario_on_postgresql(ctx, pg_url):
    run_seed_scenario(ctx, pg_url, per_producer=150)


def test_postgresql_sink_is_idempotent_and_dead_letters_what_jsonb_refuses(pg_url):
    sink = Sink.open(pg_url, "9090", max_attempts=1)
    good = Delivery(2, 0, "ok-1", "k", "8080", 1_700_000_000.0, 1, b'{"n": 1}')
    # JSONB cannot hold \u0000: a record PostgreSQL itself refuses, a real poison record.
    nul = Delivery(2, 1, "nul-1", None, "8080", 1_700_000_000.0, 1, b'{"s": "\\u0000"}')
    first = sink.store([Batch(2, 1, [good, nul])])[0]  # its one try fails: buried at once
    assert (first.inserted, first.failed, first.dead, first.done) == (1, [], [1], True)
    again = sink.store([Batch(2, 2, [good])])[0]
    assert (again.inserted, again.duplicates) == (0, 1)
    with sink.engine.connect() as conn:
        (row,) = conn.execute(select(RECORDS)).mappings()
        assert (row["id"], row["payload"], row["key"]) == ("ok-1", {"n": 1}, "k")
        assert row["created_at"] == datetime.fromtimestamp(1_700_000_000.0, UTC)
        (dead,) = conn.execute(select(DEAD_LETTERS)).mappings()
        assert dead["id"] == "nul-1"
        assert "unsupported Unicode escape" in dead["last_error"]
    sink.close()


def test_postgresql_counts_duplicates_per_batch_in_a_call_with_several(pg_url):
    sink = Sink.open(pg_url, "9091")

    def record(n: int, attempt: int = 1) -> Delivery:
        return Delivery(n % 2, n, f"multi-{n}", None, "8080", 1_700_000_000.5, attempt, b"{}")

    sink.store([Batch(1, 1, [record(1)])])
    outcomes = sink.store([Batch(0, 1, [record(0), record(2)]), Batch(1, 2, [record(1, 2)])])
    assert [(o.inserted, o.duplicates) for o in outcomes] == [(2, 0), (0, 1)]
    sink.close()


def test_postgresql_stores_a_columnar_batch_and_dead_letters_from_it(pg_url):
    sink = Sink.open(pg_url, "9092", max_attempts=1)
    records = Records([0, 1, 2], ["col-0", "col-1", "col-2"], ["k", None, None],
                      ["8080", "8081", "8080"], [1_700_000_000_123_456, 0, 1_700_000_000_123_456],
                      [1, 1, 1], [b'{"n": 0}', b'{"s": "\\u0000"}', b'{"n": 2}'])
    (first,) = sink.store([Batch(4, 1, records=records)])
    assert (first.inserted, first.failed, first.dead, first.done) == (2, [], [1], True)
    with sink.engine.connect() as conn:
        stored = {r["id"]: r for r in conn.execute(select(RECORDS)).mappings()}
    assert stored["col-0"]["created_at"] == datetime(2023, 11, 14, 22, 13, 20, 123456, UTC)
    assert (stored["col-2"]["partition"], stored["col-2"]["offset"]) == (4, 2)
    sink.close()
