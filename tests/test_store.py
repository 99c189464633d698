"""The idempotent SQL sink and dead-lettering, on SQLite; the burial rule on SQLite and
PostgreSQL (more PostgreSQL in test_postgres.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from zmqlab.errors import ConfigError, SinkUnavailable
from zmqlab.store import (
    DEAD_LETTERS,
    RECORDS,
    Batch,
    Delivery,
    Records,
    Sink,
    load_transform,
    make_engine,
)


def delivery(n: int, attempt: int = 1, payload: bytes | None = None) -> Delivery:
    return Delivery(0, n, f"id{n}", None, "8080", 1_700_000_000.0 + n, attempt,
                    payload if payload is not None else b'{"n": %d}' % n)


def rows(sink: Sink, table=RECORDS):
    with sink.engine.connect() as conn:
        return list(conn.execute(select(table)).mappings())


def test_a_batch_is_stored_and_a_redelivery_stores_nothing_twice(db_url):
    sink = Sink.open(db_url, "9090")
    first = sink.store([Batch(0, 1, [delivery(0), delivery(1)])])
    assert (first[0].inserted, first[0].duplicates, first[0].done) == (2, 0, True)
    again = sink.store([Batch(0, 2, [delivery(1, attempt=2), delivery(2)])])
    assert (again[0].inserted, again[0].duplicates) == (1, 1)
    stored = rows(sink)
    assert sorted(r["id"] for r in stored) == ["id0", "id1", "id2"]
    assert stored[0]["payload"] == {"n": 0}  # raw JSON text stored as a JSON object
    assert stored[0]["consumer"] == "9090"
    created = datetime.fromtimestamp(1_700_000_000.0, UTC).replace(tzinfo=None)
    assert stored[0]["created_at"].replace(tzinfo=None) == created  # read back by SQLAlchemy
    assert stored[0]["stored_at"] >= created
    sink.close()


def refuse_poison(payload: dict) -> dict:
    if payload.get("poison"):
        raise ValueError("poison record")
    return {**payload, "seen": True}


def test_a_record_that_fails_is_retried_then_dead_lettered_while_others_are_stored(db_url):
    sink = Sink.open(db_url, "9090", max_attempts=3, transform=refuse_poison)
    bad = delivery(1, payload=b'{"poison": true}')
    first = sink.store([Batch(0, 1, [delivery(0), bad, delivery(2)])])[0]
    assert first.inserted == 2 and [d.id for d in first.failed] == ["id1"]
    assert rows(sink)[0]["payload"] == {"n": 0, "seen": True}
    second = sink.store([Batch(0, 1, first.failed)])[0]
    assert not second.done and second.failed[0].failures == 2
    third = sink.store([Batch(0, 1, second.failed)])[0]  # its third try: buried at once
    assert (third.dead, third.failed, third.done) == ([1], [], True)
    (dead,) = rows(sink, DEAD_LETTERS)
    assert (dead["id"], dead["attempts"], dead["payload"]) == ("id1", 3, '{"poison": true}')
    assert "poison record" in dead["last_error"]
    assert sorted(r["id"] for r in rows(sink)) == ["id0", "id2"]
    sink.close()


# -- the burial rule, on SQLite and PostgreSQL --------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, db_url):
    """Each burial-rule test runs on both databases (PostgreSQL: see conftest's pg_url)."""
    return db_url if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_a_record_delivered_max_attempts_times_is_inserted_not_buried_unseen(url):
    """Given records redelivered past --max-attempts (their ACKs were lost, not their inserts),
    when a consumer stores them, then each gets a real insert: a new one is stored, one stored
    earlier counts as a duplicate, and neither is listed as dead."""
    sink = Sink.open(url, "9090", max_attempts=3)
    sink.store([Batch(0, 1, [delivery(1)])])  # a delivery whose ACK never arrived
    (outcome,) = sink.store([Batch(0, 5, [delivery(0, attempt=4), delivery(1, attempt=4)])])
    assert (outcome.inserted, outcome.duplicates, outcome.dead, outcome.done) == (1, 1, [], True)
    assert sorted(r["id"] for r in rows(sink)) == ["id0", "id1"]
    assert rows(sink, DEAD_LETTERS) == []
    sink.close()


def test_columns_past_max_attempts_stay_on_the_fast_path_and_are_stored(url):
    sink = Sink.open(url, "9090", max_attempts=1)
    batch = Batch(0, 3, records=columns_of([delivery(0, attempt=2), delivery(1, attempt=9)]))
    (outcome,) = sink.store([batch])
    assert (outcome.inserted, outcome.dead, outcome.done) == (2, [], True)
    assert batch.records is not None  # no Delivery per record was made
    assert rows(sink, DEAD_LETTERS) == []
    sink.close()


def test_a_record_that_fails_its_one_try_past_max_attempts_is_buried_with_the_real_error(url):
    sink = Sink.open(url, "9090", max_attempts=3, transform=refuse_poison)
    bad = delivery(1, attempt=4, payload=b'{"poison": true}')
    (outcome,) = sink.store([Batch(0, 4, [delivery(0, attempt=4), bad])])
    assert (outcome.inserted, outcome.dead, outcome.failed, outcome.done) == (1, [1], [], True)
    (dead,) = rows(sink, DEAD_LETTERS)
    assert (dead["id"], dead["attempts"]) == ("id1", 4)
    assert dead["last_error"] == "transform: ValueError: poison record"
    sink.close()


def test_an_id_already_in_records_is_never_buried(url):
    """Given a record stored by an earlier delivery, when a later copy of it fails past
    --max-attempts (here: a transform that refuses it now), then it is a duplicate, not dead."""
    plain = Sink.open(url, "9090")
    plain.store([Batch(0, 1, [delivery(1, payload=b'{"poison": true}')])])
    plain.close()
    sink = Sink.open(url, "9091", max_attempts=1, transform=refuse_poison)
    (outcome,) = sink.store([Batch(0, 2, [delivery(1, attempt=2, payload=b'{"poison": true}')])])
    assert (outcome.duplicates, outcome.dead, outcome.failed, outcome.done) == (1, [], [], True)
    assert rows(sink, DEAD_LETTERS) == []
    assert [r["consumer"] for r in rows(sink)] == ["9090"]
    sink.close()


def test_a_record_that_no_table_takes_is_reported_stuck_and_the_others_are_stored(url, caplog):
    """Given a record that ``records`` and ``dead_letters`` both refuse (no producer: NOT NULL
    in both), when its attempts are used up, then it is neither retried for ever nor counted
    as stored: it comes back ``stuck`` with both errors, logged at ERROR, and the rest of the
    batch is stored."""
    sink = Sink.open(url, "9090", max_attempts=1)
    broken = Delivery(0, 1, "broken", None, None, 1_700_000_000.0, 1, b"{}")  # type: ignore
    with caplog.at_level(logging.ERROR, logger="zmqlab.store"):
        (outcome,) = sink.store([Batch(0, 1, [delivery(0), broken, delivery(2)])])
    assert (outcome.inserted, outcome.dead, outcome.failed, outcome.done) == (2, [], [], True)
    assert [d.id for d in outcome.stuck] == ["broken"]
    assert "dead letter refused" in outcome.stuck[0].last_error
    assert "null" in outcome.stuck[0].last_error.lower()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'broken'" in errors[0] and "left unacknowledged" in errors[0]
    assert rows(sink, DEAD_LETTERS) == []
    sink.close()


def test_one_dead_letter_refused_does_not_keep_the_others_out_of_dead_letters(url):
    sink = Sink.open(url, "9090", max_attempts=1, transform=refuse_poison)
    poison = delivery(1, payload=b'{"poison": true}')
    broken = Delivery(0, 2, "broken", None, None, 1_700_000_000.0, 1, b"{}")  # type: ignore
    (outcome,) = sink.store([Batch(0, 1, [delivery(0), poison, broken])])
    assert (outcome.inserted, outcome.dead, outcome.done) == (1, [1], True)
    assert [d.id for d in outcome.stuck] == ["broken"]
    assert [r["id"] for r in rows(sink, DEAD_LETTERS)] == ["id1"]
    sink.close()


def test_a_transform_is_loaded_by_its_import_path():
    assert load_transform("test_store:refuse_poison") is refuse_poison
    with pytest.raises(ConfigError):
        load_transform("no_such_module:f")
    with pytest.raises(ConfigError):
        load_transform("just-a-name")


def test_an_unreachable_database_is_reported_as_unavailable():
    with pytest.raises(SinkUnavailable):
        Sink.open("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2", "9090")


@pytest.mark.parametrize("url", ["mysql://x@localhost/db", "nonsense"])
def test_unsupported_database_urls_are_clear_errors(url):
    with pytest.raises(ConfigError):
        make_engine(url)


@pytest.mark.parametrize("timestamp", [0.0, 1_700_000_000.0, 1_700_000_000.9999996,
                                       1_764_441_888.123456, 1_764_441_888.5000005, 86_399.25])
def test_sqlite_datetime_text_is_what_strftime_gives(timestamp):
    from zmqlab.store import _sqlite_datetime

    expected = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    assert _sqlite_datetime(timestamp) == expected


def test_a_held_writer_turn_outlasts_the_transactions_inside_it(db_url):
    import fcntl

    sink = Sink.open(db_url, "9090")
    other = open(db_url.removeprefix("sqlite:///") + ".zmqlab-lock", "a+b")  # another writer
    try:
        with sink.turn():
            sink.store([Batch(0, 1, [delivery(0)])])
            with pytest.raises(BlockingIOError):  # the inner transaction did not release it
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the outer turn
    finally:
        other.close()
        sink.close()


def test_one_call_with_several_batches_counts_each_batchs_duplicates(db_url):
    sink = Sink.open(db_url, "9090")
    sink.store([Batch(1, 1, [delivery(1), delivery(2)])])
    twice = Delivery(0, 9, "id3", None, "8080", 1_700_000_000.0, 1, b'{"again": 1}')
    outcomes = sink.store([Batch(0, 1, [delivery(0), delivery(3)]),
                           Batch(1, 2, [delivery(1, attempt=2), delivery(2, attempt=2)]),
                           Batch(2, 1, [delivery(4), twice])])
    assert [(o.inserted, o.duplicates) for o in outcomes] == [(2, 0), (0, 2), (1, 1)]
    assert sorted(r["id"] for r in rows(sink)) == ["id0", "id1", "id2", "id3", "id4"]
    sink.close()


def test_a_sqlite_sink_checkpoints_the_wal_itself_once_it_handed_the_turn_over(db_url,
                                                                               monkeypatch):
    import os

    from zmqlab import store

    monkeypatch.setattr(store, "CHECKPOINT_ROWS", 300)
    sink = Sink.open(db_url, "9090")
    path = db_url.removeprefix("sqlite:///")
    with sink.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 20_000
    before = os.path.getsize(path)
    sink.store([Batch(0, 1, [delivery(n) for n in range(200)])])
    assert os.path.getsize(path) == before  # not due: the rows are in the WAL only
    with sink.turn():
        sink.store([Batch(0, 1, [delivery(n) for n in range(200, 400)])])
        assert os.path.getsize(path) == before  # due, but others would wait for this turn
    assert os.path.getsize(path) > before  # checkpointed after handing the turn over
    assert len(rows(sink)) == 400
    sink.close()


def test_one_by_one_after_a_failed_batch_a_second_copy_counts_as_a_duplicate(db_url):
    sink = Sink.open(db_url, "9090")
    broken = Delivery(0, 7, "broken", None, None, 1_700_000_000.0, 1, b"{}")  # type: ignore
    outcomes = sink.store([Batch(0, 1, [delivery(1)]),
                           Batch(1, 2, [delivery(1, attempt=2), broken])])
    assert [(o.inserted, o.duplicates) for o in outcomes] == [(1, 0), (0, 1)]
    assert [d.id for d in outcomes[1].failed] == ["broken"]  # NOT NULL producer: retried
    sink.close()


def test_a_sqlite_sink_checkpoints_what_it_wrote_when_it_closes(db_url):
    import os

    sink = Sink.open(db_url, "9090")
    path = db_url.removeprefix("sqlite:///")
    before = os.path.getsize(path)
    sink.store([Batch(0, 1, [delivery(n) for n in range(100)])])  # far from CHECKPOINT_ROWS
    assert os.path.getsize(path) == before
    sink.close()
    assert os.path.getsize(path) > before


def columns_of(deliveries: list[Delivery]) -> Records:
    return Records([d.offset for d in deliveries], [d.id for d in deliveries],
                   [d.key for d in deliveries], [d.producer for d in deliveries],
                   [round(d.created_at * 1_000_000) for d in deliveries],
                   [d.attempt for d in deliveries], [d.payload for d in deliveries])


def test_a_columnar_batch_stores_the_same_rows_as_its_deliveries(tmp_path):
    made = [Delivery(3, 10 + n, f"c{n}", "k" if n % 2 else None, "8081",
                     (1_700_000_000_250_000 + n * 142_857) / 1_000_000, 1 + n % 2,
                     b'{"n": %d, "s": "\xc3\xa9"}' % n)
            for n in range(5)]
    stored = []
    for name, batch in (("objects", Batch(3, 2, made)),
                        ("columns", Batch(3, 2, records=columns_of(made)))):
        sink = Sink.open(f"sqlite:///{tmp_path / name}.db", "9091")
        (outcome,) = sink.store([batch])
        assert (outcome.inserted, outcome.duplicates, outcome.done) == (5, 0, True)
        stored.append([{k: v for k, v in r.items() if k != "stored_at"} for r in rows(sink)])
        sink.close()
    assert stored[0] == stored[1]
    assert stored[1][0]["payload"] == {"n": 0, "s": "é"}


def test_a_columnar_batch_falls_back_to_its_records_one_by_one(db_url):
    sink = Sink.open(db_url, "9090", max_attempts=2)
    sink.store([Batch(0, 1, [delivery(1)])])
    records = columns_of([delivery(0), delivery(1), delivery(2, attempt=3), delivery(3)])
    records.producers[3] = None  # type: ignore[call-overload]  # NOT NULL: fails on its own
    batch = Batch(0, 2, records=records)
    assert (len(batch), batch.offsets) == (4, [0, 1, 2, 3])
    (outcome,) = sink.store([batch])
    assert (outcome.inserted, outcome.duplicates, outcome.dead) == (2, 1, [])
    assert [(d.id, d.failures) for d in outcome.failed] == [("id3", 1)]
    assert batch.records is None  # its deliveries carry the failures from now on
    assert sorted(r["id"] for r in rows(sink)) == ["id0", "id1", "id2"]
    sink.close()


def test_a_batch_needs_deliveries_or_columns_of_one_length():
    with pytest.raises(TypeError):
        Batch(0, 1)
    records = columns_of([delivery(0), delivery(1)])
    with pytest.raises(ValueError, match="differ in length"):
        Batch(0, 1, records=records._replace(ids=["only-one"]))


def test_the_latest_creation_time_the_broker_accepts_is_stored(db_url):
    from zmqlab.protocol import MAX_CREATED_US

    records = columns_of([delivery(0), delivery(1)])._replace(
        created_us=[MAX_CREATED_US - 1, 0])
    sink = Sink.open(db_url, "9090")
    (outcome,) = sink.store([Batch(0, 1, records=records)])
    assert (outcome.inserted, outcome.done) == (2, True)
    years = sorted(r["created_at"].year for r in rows(sink))
    assert years == [1970, 9999]
    sink.close()


def test_a_column_that_changed_length_after_the_batch_was_made_fails_the_batch(db_url):
    sink = Sink.open(db_url, "9090")
    batch = Batch(0, 1, records=columns_of([delivery(0), delivery(1), delivery(2)]))
    batch.records.ids.pop()  # type: ignore[union-attr]
    with pytest.raises(ValueError):  # not stored short, with every offset acknowledged
        sink.store([batch])
    assert rows(sink) == []
    sink.close()


def test_a_columnar_batch_goes_through_the_users_transform(db_url):
    sink = Sink.open(db_url, "9090", max_attempts=3, transform=refuse_poison)
    records = columns_of([delivery(0), delivery(1, payload=b'{"poison": true}')])
    (outcome,) = sink.store([Batch(0, 1, records=records)])
    assert outcome.inserted == 1 and [d.id for d in outcome.failed] == ["id1"]
    assert rows(sink)[0]["payload"] == {"n": 0, "seen": True}
    sink.close()


@pytest.mark.postgres
@pytest.mark.parametrize("what", ["id with NUL", "key with NUL", "producer over 255 chars"])
def test_a_record_postgresql_refuses_in_both_tables_is_stuck_not_retried_for_ever(pg_url, what):
    """Case 3 of "Faults without loss": PostgreSQL refuses NUL in any text column and names
    over 255 characters, in ``records`` and in ``dead_letters`` alike."""
    record_id, key, producer = {"id with NUL": ("a\x00b", None, "8080"),
                                "key with NUL": ("k", "a\x00b", "8080"),
                                "producer over 255 chars": ("p", None, "x" * 300)}[what]
    sink = Sink.open(pg_url, "9090", max_attempts=2)
    bad = Delivery(0, 1, record_id, key, producer, 1_700_000_000.0, 1, b"{}")
    first = sink.store([Batch(0, 1, [delivery(0), bad])])[0]
    assert first.inserted == 1 and [d.id for d in first.failed] == [record_id]
    second = sink.store([Batch(0, 1, first.failed)])[0]
    assert (second.failed, second.dead, second.done) == ([], [], True)
    assert [d.id for d in second.stuck] == [record_id]
    assert "dead letter refused" in second.stuck[0].last_error
    assert [r["id"] for r in rows(sink)] == ["id0"] and rows(sink, DEAD_LETTERS) == []
    sink.close()
