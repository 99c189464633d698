"""The SQL side: SQLModel tables, engines for SQLite and PostgreSQL, and the idempotent sink.

The sink writes every batch in one transaction with ``INSERT … ON CONFLICT (id) DO NOTHING``,
so a record redelivered after a crash between COMMIT and ACK is never stored twice. The
statement is built once from the SQLModel table and runs through the driver's ``executemany``
(not an ORM object, nor SQLAlchemy's per-row parameter processing, per record). Payloads arrive
as raw JSON text and are written as they are, never decoded and re-encoded.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from itertools import repeat
from typing import Any, NamedTuple

from sqlalchemy import JSON, BigInteger, Column, DateTime, Engine, Text, event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlmodel import Field, SQLModel, create_engine

from zmqlab.errors import ConfigError, SinkUnavailable
from zmqlab.protocol import MAX_ID_CHARS, MAX_KEY_CHARS, parse_json

log = logging.getLogger("zmqlab.store")

Transform = Callable[[dict[str, Any]], dict[str, Any]]
"""A user hook run on each payload before it is stored; raising marks the record as failed."""


PAYLOAD_TYPE = JSON().with_variant(JSONB(), "postgresql")
CHECKPOINT_ROWS = 10_000  # a consumer checkpoints a SQLite WAL after writing this many rows
# (about SQLite's own 1,000-page default, with ~400 bytes a row and its index entries)
SAFETY_CHECKPOINT_PAGES = 20_000  # SQLite checkpoints by itself only past this WAL size


class StoredRecord(SQLModel, table=True):
    """A record as stored by a consumer (the wire's record is ``Delivery``)."""

    __tablename__ = "records"

    id: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    partition: int = Field(index=True)
    offset: int = Field(sa_type=BigInteger)
    key: str | None = Field(default=None, max_length=MAX_KEY_CHARS, index=True)
    producer: str = Field(max_length=255)
    consumer: str = Field(max_length=255)
    payload: dict[str, Any] = Field(sa_column=Column(PAYLOAD_TYPE, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    stored_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    attempt: int = 1


class DeadLetter(SQLModel, table=True):
    """A record that failed ``max_attempts`` deliveries; kept with its payload and last error."""

    __tablename__ = "dead_letters"

    id: str = Field(primary_key=True, max_length=MAX_ID_CHARS)
    partition: int
    offset: int = Field(sa_type=BigInteger)
    key: str | None = Field(default=None, max_length=MAX_KEY_CHARS)
    producer: str = Field(max_length=255)
    consumer: str = Field(max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # as received, even if invalid
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    failed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    attempts: int
    last_error: str = Field(sa_column=Column(Text, nullable=False))


RECORDS = StoredRecord.__table__  # type: ignore[attr-defined]
COLUMNS = ("id", "partition", "offset", "key", "producer", "consumer", "payload", "created_at",
           "stored_at", "attempt")
DEAD_LETTERS = DeadLetter.__table__  # type: ignore[attr-defined]


def load_transform(spec: str) -> Transform:
    """Import ``package.module:function`` (the consumer's ``--transform`` option)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"transform must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot load transform {spec!r}: {error}") from None
    if not callable(function):
        raise ConfigError(f"transform {spec!r} is not callable")
    return function  # type: ignore[no-any-return]


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver the ``postgres`` extra installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, busy timeout, BEGIN IMMEDIATE) or PostgreSQL; tables created."""
    engine = engine_for(url)
    create_tables(engine)
    return engine


def check_url(url: str) -> None:
    """Raise ConfigError now for a URL that can never work (without connecting)."""
    engine_for(url).dispose()


def engine_for(url: str) -> Engine:
    """The engine for ``url``, configured but not connected yet."""
    try:
        parsed = make_url(normalize_url(url))
    except exc.ArgumentError as error:
        raise ConfigError(f"not a database URL: {url!r} ({error})") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})
        _sqlite_pragmas(engine)
    elif backend == "postgresql":
        try:
            engine = create_engine(parsed, pool_pre_ping=True)
        except ModuleNotFoundError as error:
            raise ConfigError(f"PostgreSQL needs its driver: pip install 'zmqlab[postgres]' "
                              f"({error})") from None
    else:
        raise ConfigError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    return engine


def _sqlite_pragmas(engine: Engine) -> None:
    # Several consumer processes share one file: WAL lets readers run beside the writer, the
    # busy timeout makes a writer wait for the lock instead of failing, and BEGIN IMMEDIATE
    # takes the write lock up front so the wait honours that timeout (a deferred transaction
    # that upgrades later can fail at once with "database is locked").
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _no_auto_checkpoint(dbapi_connection: Any, _record: Any) -> None:
    """SQLite's own checkpoint only as a safety net (a WAL of ~80 MB: consumers that write
    little and restart often never reach their own checkpoint's row count)."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA wal_autocheckpoint={SAFETY_CHECKPOINT_PAGES}")
    cursor.close()


def create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create missing tables; tolerate another consumer creating them at the same moment."""
    for attempt in range(attempts):
        try:
            SQLModel.metadata.create_all(engine, tables=[RECORDS, DEAD_LETTERS])
            return
        except (exc.OperationalError, exc.ProgrammingError, exc.IntegrityError) as error:
            if not _is_unavailable(error) and attempt == attempts - 1:
                raise
            if attempt == attempts - 1:
                raise SinkUnavailable(f"cannot create tables: {error.orig}") from error
            time.sleep(0.05 * (attempt + 1))  # back off before re-checking what exists


def _is_unavailable(error: BaseException) -> bool:
    """Connection trouble or a lock: retry the whole batch later, it is not the records' fault."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, exc.OperationalError | exc.InterfaceError | exc.DisconnectionError
                      | exc.TimeoutError)


@dataclass(slots=True)
class Delivery:
    """One record as a consumer received it."""

    partition: int
    offset: int
    id: str
    key: str | None
    producer: str
    created_at: float
    attempt: int
    payload: bytes
    failures: int = 0  # failed inserts at this consumer, added to attempt for dead-lettering
    last_error: str = ""


class Records(NamedTuple):
    """A batch's records as the columns RECORDS carries, one list each, in offset order.

    The hot path writes them with one ``zip`` into driver rows, never a ``Delivery`` per
    record: building a Delivery and then a row from it was a fifth of a consumer's Python
    time. Deliveries are made only when a record needs its own life (a retry, a dead letter).
    """

    offsets: list[int]
    ids: list[str]
    keys: list[str | None]
    producers: list[str]
    created_us: list[int]  # microseconds of Unix time
    attempts: list[int]
    payloads: list[bytes]


class Batch:
    """One partition's records from a RECORDS message: acknowledged together, for their epoch.

    Made either from ``Delivery`` objects or, on the hot path, from ``Records`` columns; the
    deliveries of a columnar batch are made the first time someone asks for them.
    """

    __slots__ = ("partition", "epoch", "session", "_records", "_deliveries")

    def __init__(self, partition: int, epoch: int, deliveries: list[Delivery] | None = None,
                 session: str = "", *, records: Records | None = None) -> None:
        if (deliveries is None) == (records is None):
            raise TypeError("a Batch is made of deliveries or of records, one of the two")
        if records is not None:
            lengths = {name: len(column) for name, column in records._asdict().items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"a Batch's columns differ in length: {lengths}")
        self.partition = partition
        self.epoch = epoch
        self.session = session  # the broker session that delivered it (its ACK names it)
        self._records = records
        self._deliveries = deliveries

    @property
    def records(self) -> Records | None:
        """The columns, while no Delivery was made from them (they would not see its
        ``failures``); None afterwards, and for a batch made of deliveries."""
        return self._records if self._deliveries is None else None

    @property
    def deliveries(self) -> list[Delivery]:
        """One object per record, for a record that needs state of its own (failures, the
        last error); from then on the batch is its deliveries and its columns are not used."""
        if self._deliveries is None:
            assert self._records is not None
            number = self.partition
            self._deliveries = [
                Delivery(number, offset, record_id, key, producer, created_us / 1_000_000,
                         attempt, payload)
                for offset, record_id, key, producer, created_us, attempt, payload
                in zip(*self._records, strict=True)]
        return self._deliveries

    @property
    def offsets(self) -> list[int]:
        """The offsets to acknowledge (a new list once the batch is its deliveries)."""
        records = self.records
        return records.offsets if records is not None else [d.offset for d in self.deliveries]

    def __len__(self) -> int:
        records = self.records
        return len(records.offsets) if records is not None else len(self.deliveries)

    def __repr__(self) -> str:
        return f"Batch(partition={self.partition}, epoch={self.epoch}, records={len(self)})"


@dataclass(slots=True)
class Outcome:
    """What a store call did with one batch."""

    batch: Batch
    inserted: int = 0
    duplicates: int = 0
    dead: list[int] = field(default_factory=list)  # offsets that went to dead letters
    failed: list[Delivery] = field(default_factory=list)  # retry these, the batch is not done
    # Stored nowhere: refused by ``records`` and by ``dead_letters``. Never acknowledged, so
    # the broker keeps them in flight; ``last_error`` says why (see ``Sink.store``).
    stuck: list[Delivery] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Nothing left to retry now (``stuck`` records wait for the broker to redeliver)."""
        return not self.failed


_Rows = tuple[Outcome, list[Delivery] | None, list[tuple[Any, ...]]]
"""A batch's outcome, the deliveries being written (None: all of the batch's, in order) and
their rows, in the same order."""


class Sink:
    """Writes batches idempotently; decides when a failing record becomes a dead letter."""

    def __init__(self, engine: Engine, consumer: str, max_attempts: int = 5,
                 transform: Transform | None = None) -> None:
        self.engine = engine
        self.consumer = consumer
        self.max_attempts = max_attempts
        self.transform = transform
        dialect = engine.dialect.name
        insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        self._insert_dead = insert(DEAD_LETTERS).on_conflict_do_nothing(index_elements=["id"])
        # The hot path goes to the driver's executemany with one prepared single-row statement,
        # because SQLAlchemy's multi-row VALUES with RETURNING re-parses a statement with
        # thousands of placeholders; the driver's rowcount still tells inserted from duplicate.
        preparer = engine.dialect.identifier_preparer
        self._marker = marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._table = preparer.format_table(RECORDS)
        self._sql_records = (
            f"INSERT INTO {self._table} ({', '.join(preparer.quote(c) for c in COLUMNS)}) "
            f"VALUES ({', '.join([marker] * len(COLUMNS))}) ON CONFLICT (id) DO NOTHING")
        # SQLite keeps datetimes as text in SQLAlchemy's own format; PostgreSQL takes objects.
        self._when: Callable[[float], Any] = (
            _sqlite_datetime if dialect == "sqlite"
            else (lambda ts: datetime.fromtimestamp(ts, UTC)))
        self._writers = _WriterLock.for_engine(engine)
        self._uncheckpointed = 0  # rows this sink wrote since its last checkpoint
        if self._writers.shared:
            # SQLite checkpoints the WAL inside the COMMIT that crosses 1,000 pages, with an
            # fsync of the database file, inside the writer's turn, while every other consumer
            # waits. The sink checkpoints itself instead, after giving the turn back, so the
            # others write meanwhile (a PASSIVE checkpoint never blocks a writer).
            event.listen(engine, "connect", _no_auto_checkpoint)
            engine.dispose()  # connections made before the listener reconnect with it
            self._writers.on_release = self._checkpoint_if_due

    def _checkpoint_if_due(self, due: int | None = None) -> None:
        if self._uncheckpointed < (CHECKPOINT_ROWS if due is None else due):
            return
        self._uncheckpointed = 0
        try:
            raw = self.engine.raw_connection()  # no transaction: a checkpoint cannot run in one
            try:
                cursor = raw.cursor()
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                cursor.close()
            finally:
                raw.close()
        except Exception as error:  # what is committed stays committed; the next one retries
            log.warning("WAL checkpoint failed (retried after the next %d rows): %s",
                        CHECKPOINT_ROWS, _describe(error))

    def _transaction(self) -> Any:
        """A write transaction, taken in turn with the other consumers of a SQLite file."""
        return _chained(self._writers, self.engine.begin())

    def turn(self) -> _WriterLock:
        """Hold the writer's turn across several calls (re-entrant; only SQLite files have
        turns, for other databases this holds nothing)."""
        return self._writers

    @classmethod
    def open(cls, url: str, consumer: str, max_attempts: int = 5,
             transform: Transform | None = None) -> Sink:
        try:
            return cls(make_engine(url), consumer, max_attempts, transform)
        except exc.SQLAlchemyError as error:
            raise SinkUnavailable(f"cannot open database {url}: {error}") from error

    def close(self) -> None:
        if self._writers.shared:
            self._checkpoint_if_due(1)  # what this sink wrote since its last checkpoint
        self.engine.dispose()
        self._writers.close()

    def store(self, batches: Sequence[Batch]) -> list[Outcome]:
        """Store batches in one transaction; raise SinkUnavailable to have them all retried.

        If the transaction fails for something other than connection trouble, each record is
        tried on its own so that one bad record cannot hold back the others. A record that
        failed is retried (``failed``) until its deliveries and failures here exceed
        ``max_attempts``; then it is buried in ``dead_letters`` with the error it failed with.
        Every record gets a real insert first, however often it was delivered, because a
        record redelivered after a lost ACK is usually stored already: burying it unseen
        would list it as dead while it is stored. An id already in ``records`` is never
        buried. A record that ``dead_letters`` refuses too is ``stuck``: reported loudly and
        left unacknowledged, so it stays in the broker instead of being lost or retried here
        for ever while the consumer's other records wait.
        """
        outcomes = [Outcome(b) for b in batches]
        now = datetime.now(UTC)
        stored_at = self._when(now.timestamp())
        fresh = [self._rows(o, stored_at) for o in outcomes]
        try:
            with self._transaction() as conn:
                self._insert(conn, fresh)
        except exc.SQLAlchemyError as error:
            if _is_unavailable(error):
                raise SinkUnavailable(_describe(error)) from error
            log.warning("batch insert failed (%s); trying its records one by one", _describe(error))
            for outcome in outcomes:
                outcome.inserted = outcome.duplicates = 0
            for outcome, deliveries, rows in fresh:
                if deliveries is None:
                    deliveries = outcome.batch.deliveries
                for delivery, row in zip(deliveries, rows, strict=True):
                    self._store_one(outcome, delivery, row)
        self._bury(outcomes, now)
        return outcomes

    def _rows(self, outcome: Outcome, stored_at: Any) -> _Rows:
        """The driver-ready rows (COLUMNS order) of a batch's records; a record the user's
        transform refuses is marked failed instead.

        A columnar batch becomes rows in one ``zip`` (no Python bytecode per record); a batch of
        deliveries in one comprehension. Each distinct creation time is formatted once (a
        client's batch shares one), because formatting a time is costly per record."""
        consumer = self.consumer
        when = self._when
        records = outcome.batch.records
        # the hot path: columns in, rows out, all in C
        if records is not None and self.transform is None:
            # strict, with bounded repeats: a column that changed length after the batch was
            # made must fail the batch, not store it short and have the rest acknowledged
            n = len(records.offsets)
            created = {us: when(us / 1_000_000) for us in set(records.created_us)}
            rows = list(zip(records.ids, repeat(outcome.batch.partition, n), records.offsets,
                            records.keys, records.producers, repeat(consumer, n),
                            map(_text, records.payloads), map(created.__getitem__,
                                                              records.created_us),
                            repeat(stored_at, n), records.attempts, strict=True))
            return outcome, None, rows
        deliveries = outcome.batch.deliveries
        times = {t: when(t) for t in {d.created_at for d in deliveries}}
        if self.transform is None:  # the hot path: the JSON text goes in as it came
            rows = [(d.id, d.partition, d.offset, d.key, d.producer, consumer,
                     _text(d.payload), times[d.created_at], stored_at, d.attempt)
                    for d in deliveries]
            return outcome, deliveries, rows
        kept: list[Delivery] = []
        rows = []
        for d in deliveries:
            try:
                payload = self._transformed(d.payload)
            except Exception as error:  # the user's transform refused this record
                self._failed(outcome, d, f"transform: {type(error).__name__}: {error}")
                continue
            kept.append(d)
            rows.append((d.id, d.partition, d.offset, d.key, d.producer, consumer, payload,
                         times[d.created_at], stored_at, d.attempt))
        return outcome, kept, rows

    def _insert(self, conn: Any, groups: list[_Rows]) -> None:
        """Every batch's rows in one ``executemany``: each call has a fixed SQLAlchemy and
        driver overhead (a pipeline sync on psycopg), and a transaction holds several batches
        (a consumer's partitions, several messages). The rowcount tells how many were new;
        only when some were not does a lookup tell which batch they belonged to."""
        rows = [row for _, _, batch_rows in groups for row in batch_rows]
        if not rows:
            return
        result = conn.exec_driver_sql(self._sql_records, rows)
        self._uncheckpointed += len(rows)
        if result.rowcount < 0 or result.rowcount == len(rows):
            for outcome, _, batch_rows in groups:
                outcome.inserted += len(batch_rows)
            return
        if len(rows) == 1:  # one by one (the fallback): the rowcount says it all, and an
            groups[0][0].duplicates += 1  # earlier call may share this stored_at
            return
        mine = self._written_by(conn, rows)
        for outcome, _, batch_rows in groups:
            for row in batch_rows:
                if row[0] in mine:
                    mine.discard(row[0])  # an id twice in one call: the second is the duplicate
                    outcome.inserted += 1
                else:
                    outcome.duplicates += 1

    def _written_by(self, conn: Any, rows: list[tuple[Any, ...]]) -> set[str]:
        """The ids among ``rows`` whose stored row is theirs (this consumer and this
        transaction's ``stored_at``), not an earlier copy."""
        consumer, stored_at = rows[0][5], rows[0][8]
        ids = list({row[0] for row in rows})
        mine: set[str] = set()
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            found = conn.exec_driver_sql(self._sql_lookup(len(chunk)), tuple(chunk)).fetchall()
            mine.update(i for i, c, at in found if c == consumer and at == stored_at)
        return mine

    def _sql_lookup(self, count: int) -> str:
        return (f"SELECT id, consumer, stored_at FROM {self._table} "
                f"WHERE id IN ({', '.join([self._marker] * count)})")

    def _bury(self, outcomes: list[Outcome], now: datetime) -> None:
        """Move the failed records that have used up their attempts to ``dead_letters`` (in
        one transaction, or one by one if that fails); ids already in ``records`` count as
        duplicates instead."""
        limit = self.max_attempts
        items = [(o, d) for o in outcomes for d in o.failed if d.attempt + d.failures > limit]
        if not items:
            return
        try:
            self._bury_now(items, now)
            return
        except exc.SQLAlchemyError as error:
            if _is_unavailable(error):
                raise SinkUnavailable(_describe(error)) from error
            if len(items) == 1:
                self._stuck(*items[0], _describe(error))
                return
        for outcome, delivery in items:
            try:
                self._bury_now([(outcome, delivery)], now)
            except exc.SQLAlchemyError as error:
                if _is_unavailable(error):
                    raise SinkUnavailable(_describe(error)) from error
                self._stuck(outcome, delivery, _describe(error))

    def _bury_now(self, items: list[tuple[Outcome, Delivery]], now: datetime) -> None:
        """One transaction: bury those of ``items`` whose id is not in ``records``; the
        outcomes change only once it committed."""
        with self._transaction() as conn:
            stored = self._stored_ids(conn, [d.id for _, d in items])
            dead = [(o, d) for o, d in items if d.id not in stored]
            if dead:
                conn.execute(self._insert_dead, [self._dead_row(d, now) for _, d in dead])
        for outcome, delivery in items:
            outcome.failed = [d for d in outcome.failed if d is not delivery]
            if delivery.id in stored:  # stored by an earlier delivery: nothing is lost
                outcome.duplicates += 1
                continue
            outcome.dead.append(delivery.offset)
            log.warning("dead letter id=%s partition=%d offset=%d attempts=%d error=%s",
                        delivery.id, delivery.partition, delivery.offset,
                        delivery.attempt + delivery.failures - 1, delivery.last_error)

    def _stored_ids(self, conn: Any, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            rows = conn.exec_driver_sql(self._sql_lookup(len(chunk)), tuple(chunk)).fetchall()
            found.update(row[0] for row in rows)
        return found

    def _stuck(self, outcome: Outcome, delivery: Delivery, error: str) -> None:
        outcome.failed = [d for d in outcome.failed if d is not delivery]
        delivery.last_error = f"{delivery.last_error}; dead letter refused: {error}"
        outcome.stuck.append(delivery)
        log.error("record id=%r partition=%d offset=%d can be stored neither in records nor in "
                  "dead_letters (%s): left unacknowledged in the broker",
                  delivery.id, delivery.partition, delivery.offset, delivery.last_error)

    def _store_one(self, outcome: Outcome, delivery: Delivery, row: tuple[Any, ...]) -> None:
        try:
            with self._transaction() as conn:
                self._insert(conn, [(outcome, [delivery], [row])])
        except exc.SQLAlchemyError as error:
            if _is_unavailable(error):
                raise SinkUnavailable(_describe(error)) from error
            self._failed(outcome, delivery, _describe(error))

    def _failed(self, outcome: Outcome, delivery: Delivery, error: str) -> None:
        delivery.failures += 1
        delivery.last_error = error
        log.warning("record failed id=%s attempt=%d error=%s", delivery.id,
                    delivery.attempt + delivery.failures - 1, error)
        outcome.failed.append(delivery)

    def _transformed(self, payload: bytes) -> str:
        assert self.transform is not None
        result = self.transform(parse_json(payload))
        if not isinstance(result, dict):
            raise TypeError(f"transform must return a JSON object, got {type(result).__name__}")
        return json.dumps(result, separators=(",", ":"))

    def _dead_row(self, d: Delivery, now: datetime) -> dict[str, Any]:
        return {"id": d.id, "partition": d.partition, "offset": d.offset, "key": d.key,
                "producer": d.producer, "consumer": self.consumer,
                "payload": _text(d.payload),
                "created_at": datetime.fromtimestamp(d.created_at, UTC), "failed_at": now,
                "attempts": d.attempt + d.failures - 1, "last_error": d.last_error}


class _WriterLock:
    """Writers to one SQLite file take turns through an advisory lock on a sidecar file.

    SQLite's own busy handler waits by sleeping in growing steps (up to 100 ms), so with several
    consumer processes the database sat idle while waiters slept; a blocking ``flock`` hands the
    turn over the moment it is released. A holder is bounded by SQLite's busy timeout, and the
    kernel releases the lock of a process that dies. Other databases need no such lock.
    """

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a+b") if path else None  # noqa: SIM115 (held for the sink's life)
        self._depth = 0  # re-entrant: a consumer holds the turn around its transactions
        self.on_release: Callable[[], None] | None = None  # run after handing the turn over

    @property
    def shared(self) -> bool:
        """Whether this is a SQLite file that several processes may write."""
        return self._file is not None

    @classmethod
    def for_engine(cls, engine: Engine) -> _WriterLock:
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return cls(None)
        return cls(os.path.abspath(database) + ".zmqlab-lock")

    def __enter__(self) -> None:
        if self._file is not None and self._depth == 0:
            fcntl.flock(self._file, fcntl.LOCK_EX)
        self._depth += 1

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._file is not None and self._depth == 0:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            if self.on_release is not None:
                self.on_release()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@contextmanager
def _chained(lock: _WriterLock, transaction: Any) -> Iterator[Any]:
    with lock, transaction as conn:
        yield conn


def _text(payload: bytes) -> str:
    """A payload as the text column takes it (a bad byte shows as U+FFFD, never fails)."""
    return payload.decode("utf-8", errors="replace")


@lru_cache(maxsize=4096)
def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _sqlite_datetime(timestamp: float) -> str:
    """The text SQLAlchemy's SQLite DateTime type stores (and parses back) for a Unix time.

    Micro-optimization: ``strftime`` on a datetime per record is costly, and the records of
    a batch share their second, so the date and time part comes from a cache and only the
    microseconds are formatted (rounded half-even, as ``datetime.fromtimestamp``)."""
    second = math.floor(timestamp)
    micros = round((timestamp - second) * 1_000_000)
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_utc_second(second)}.{micros:06d}"


def _describe(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip().splitlines()
    return text[0] if text else type(error).__name__
