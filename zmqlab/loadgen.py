"""The load generator behind ``zmqlab load`` and ``zmqlab demo``, and the check that follows it.

``run_load`` drives producer services with K clients, each a connection with a window of
requests in flight (``PipelinedProducer``), all served by one poller loop on the calling
thread. Clients send in batches, because on a small machine the CPU goes to per-message
Python work: a batch of 50 costs one round trip instead of 50; and they pipeline, because a
round trip costs more CPU than the records it carries, and a window of them lets every hop
wake once for several. Every loop is bounded by the record count and by ``deadline_s``.

``verify`` then reads the database, bounded by its own timeout, to prove what the acks
promised: every acknowledged record is stored exactly once. Record ids carry a per-run prefix so
that a database holding earlier runs (the demo's default SQLite file) does not confuse the count.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import zmq
from sqlalchemy import func, select

from zmqlab import protocol as proto
from zmqlab.config import REPLY_TIMEOUT_MS
from zmqlab.errors import ConfigError
from zmqlab.pipelined import Completion, PipelinedProducer
from zmqlab.producer import OutRecord
from zmqlab.store import DEAD_LETTERS, RECORDS, make_engine

DEFAULT_ENDPOINTS = "tcp://127.0.0.1:8080,8081,8082"
PACE_WINDOW_S = 0.02  # with --rate, a batch holds at most this much of a client's rate


# -- options -----------------------------------------------------------------------------------
def parse_endpoints(text: str) -> list[str]:
    """Endpoints from ``tcp://h:8080,tcp://h:8081`` or the short ``tcp://h:8080,8081,8082``.

    A bare port reuses the previous endpoint's scheme and host; ``host:port`` gets ``tcp://``.
    """
    out: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "://" in item:
            scheme, rest = item.split("://", 1)
            if ":" not in rest or not rest.rsplit(":", 1)[1].isdigit():
                raise ConfigError(f"endpoint {item!r} needs a port, like tcp://127.0.0.1:8080")
            out.append(item)
        elif item.isdigit():
            if not out:
                raise ConfigError(f"port {item} needs a host first, like tcp://127.0.0.1:{item}")
            out.append(f"{out[-1].rsplit(':', 1)[0]}:{item}")
        elif ":" in item and item.rsplit(":", 1)[1].isdigit():
            out.append(f"tcp://{item}")
        else:
            raise ConfigError(f"not an endpoint: {item!r} (use tcp://127.0.0.1:8080 or a port)")
    if not out:
        raise ConfigError("no endpoint given")
    return out


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """What to send and how hard; validated once so a bad option fails before any socket."""

    endpoints: tuple[str, ...]
    records: int = 10_000
    rate: float = 0.0  # records/s over all clients; 0 = as fast as acks allow
    size: int = 200  # payload bytes (a JSON object padded to this size)
    clients: int = 3
    keys: int = 0  # records spread over this many keys; 0 = no key (round-robin)
    deadline_s: float = 60.0
    batch: int = 50  # records per PUT from one client
    window: int = 4  # PUTs in flight per client
    timeout_ms: int = REPLY_TIMEOUT_MS  # per try of a request
    retries: int = 2  # resends of an unanswered request per endpoint, then the next one

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("at least one endpoint is needed")
        for name, value, minimum in (("records", self.records, 0), ("size", self.size, 2),
                                     ("clients", self.clients, 1), ("keys", self.keys, 0),
                                     ("batch", self.batch, 1), ("window", self.window, 1),
                                     ("timeout_ms", self.timeout_ms, 10),
                                     ("retries", self.retries, 0)):
            if value < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ConfigError(f"rate must be >= 0 records/s, got {self.rate}")
        if self.deadline_s <= 0:
            raise ConfigError(f"deadline must be positive, got {self.deadline_s}")


# -- payloads ----------------------------------------------------------------------------------
def padded_payload(size: int, seq: int, client: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (or the smallest possible when ``size`` is tiny)."""
    return PayloadMaker(size, client)(seq)


class PayloadMaker:
    """``padded_payload`` for one client, made cheap because it runs once per record: the
    padding for each length of the head is made once, so a payload is one bytes format and one
    concatenation."""

    def __init__(self, size: int, client: int) -> None:
        self.size = size
        self._head = b'{"seq":%%d,"client":%d,"pad":"' % client
        self._tails: dict[int, bytes] = {}

    def __call__(self, seq: int) -> bytes:
        head = self._head % seq
        tail = self._tails.get(len(head))
        if tail is None:
            fill = self.size - len(head) - 2
            tail = b"x" * fill + b'"}' if fill >= 0 else b""
            self._tails[len(head)] = tail
        return head + tail if tail else b'{"seq":%d}' % seq

    def many(self, first: int, count: int) -> list[bytes]:
        return list(map(self, range(first, first + count)))


# -- report ------------------------------------------------------------------------------------
def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (None when empty)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def weighted_percentile(ordered: Sequence[tuple[float, int]], q: float) -> float | None:
    """``percentile`` of values given as sorted (value, how many records had it) pairs: a
    batch's records share one ack latency, so they are kept as one pair, not one per record."""
    total = sum(n for _, n in ordered)
    if not total:
        return None
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for value, n in ordered:
        seen += n
        if seen >= rank:
            return value
    return ordered[-1][0]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


@dataclass
class VerifyReport:
    """What the database holds for one run's records."""

    expected: int = 0  # acknowledged ids we looked for
    persisted: int = 0  # acknowledged ids found in ``records``
    lost: int = 0  # acknowledged, and in neither ``records`` nor ``dead_letters``
    dead_lettered: int = 0  # acknowledged, found only in ``dead_letters``
    duplicates: int = 0  # ids in both tables (``records``' primary key rules out the rest)
    unexpected: int = 0  # this run's rows whose id was never acknowledged
    waited_s: float = 0.0
    timed_out: bool = False
    e2e_s: list[float] = field(default_factory=list, repr=False)  # sorted
    by_consumer: dict[str, int] = field(default_factory=dict)
    by_partition: dict[int, int] = field(default_factory=dict)
    missing_sample: list[str] = field(default_factory=list)
    span_s: float = 0.0  # first record created -> last record stored

    @property
    def throughput_rps(self) -> float:
        """End-to-end throughput: records stored per second from first creation to last store."""
        return self.persisted / self.span_s if self.span_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.dead_lettered == 0


@dataclass
class LoadReport:
    """The outcome of one load: counts, refusals by code, latencies, and what ``verify`` saw."""

    options: LoadOptions
    run_id: str
    records: int = 0
    sent: int = 0
    acked: int = 0
    retried: int = 0
    refused: int = 0
    refusals: dict[str, dict[str, Any]] = field(default_factory=dict)  # code -> count, reason
    acked_duplicate: int = 0  # acks that said "already queued" (a retry after a lost reply)
    failovers: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    # (seconds, records) per acknowledged request, sorted: its records share one latency
    ack_latencies: list[tuple[float, int]] = field(default_factory=list, repr=False)
    # (first seq, count, created_at): the records prefix + seq, for seq in the run, were acked
    acked_runs: list[tuple[int, int, float]] = field(default_factory=list, repr=False)
    verified: VerifyReport | None = None

    @property
    def prefix(self) -> str:
        return self.run_id + "-"

    def acked_ids(self) -> dict[str, float]:
        """Every acknowledged id with its creation time, for ``verify``; built on demand
        because the load keeps runs (a dict entry per record would be work on the clients' hot
        path)."""
        return ids_of_runs(self.prefix, self.acked_runs)

    @property
    def unacked(self) -> int:
        """Records that were neither acknowledged nor refused (deadline, stop, endpoint down)."""
        return self.records - self.acked - self.refused

    @property
    def throughput_rps(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Everything acknowledged and nothing refused; and, when verified, nothing lost."""
        clean = self.acked == self.records and not self.refused and not self.interrupted
        return clean and (self.verified is None or self.verified.ok)

    def to_json(self) -> dict[str, Any]:
        lat, v = self.ack_latencies, self.verified
        e2e = v.e2e_s if v is not None else []

        def ack_ms(q: float) -> float | None:
            return _ms(weighted_percentile(lat, q))

        return {
            "records": self.records, "sent": self.sent, "acked": self.acked,
            "retried": self.retried, "refused": self.refused, "refusals": self.refusals,
            "unacked": self.unacked, "acked_duplicate": self.acked_duplicate,
            "seconds": round(self.seconds, 3), "throughput_rps": round(self.throughput_rps, 1),
            "ack_p50_ms": ack_ms(50), "ack_p90_ms": ack_ms(90), "ack_p99_ms": ack_ms(99),
            "ack_max_ms": _ms(lat[-1][0] if lat else None),
            "persisted": v.persisted if v else None, "lost": v.lost if v else None,
            "duplicates": v.duplicates if v else None,
            "dead_lettered": v.dead_lettered if v else None,
            "unexpected": v.unexpected if v else None,
            "verify_timed_out": v.timed_out if v else None,
            "e2e_p50_ms": _ms(percentile(e2e, 50)), "e2e_p90_ms": _ms(percentile(e2e, 90)),
            "e2e_p99_ms": _ms(percentile(e2e, 99)), "e2e_max_ms": _ms(e2e[-1] if e2e else None),
            "e2e_throughput_rps": round(v.throughput_rps, 1) if v else None,
            "by_consumer": v.by_consumer if v else None,
            "run_id": self.run_id, "endpoints": list(self.options.endpoints),
            "clients": self.options.clients, "batch": self.options.batch,
            "window": self.options.window,
            "size": self.options.size, "rate": self.options.rate,
            "interrupted": self.interrupted, "ok": self.ok,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def ids_of_runs(prefix: str, runs: Sequence[tuple[int, int, float]]) -> dict[str, float]:
    """The ids ``prefix + seq`` of (first seq, count, created_at) runs, each with its time."""
    return {f"{prefix}{seq}": created for first, count, created in runs
            for seq in range(first, first + count)}


@dataclass(frozen=True, slots=True)
class Progress:
    """A consistent view of the counters, for a progress bar."""

    records: int
    sent: int
    acked: int
    refused: int
    retried: int
    elapsed_s: float


# -- the clients -------------------------------------------------------------------------------
@dataclass
class _ClientResult:
    acked_runs: list[tuple[int, int, float]] = field(default_factory=list)
    latencies: list[tuple[float, int]] = field(default_factory=list)
    refusals: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: int = 0
    acked: int = 0
    refused: int = 0

    def refuse(self, code: str, reason: str, count: int) -> None:
        entry = self.refusals.setdefault(code, {"count": 0, "reason": reason})
        entry["count"] += count
        self.refused += count


class _Client:
    """One connection's share of the load: its records, its pace, its pipelined producer."""

    def __init__(self, number: int, count: int, first_seq: int, options: LoadOptions,
                 run_id: str, context: zmq.Context[Any], began: float, deadline: float) -> None:
        self.number = number
        self.count = count
        self.first_seq = first_seq
        self.options = options
        self.deadline = deadline
        self.result = _ClientResult()
        endpoints = options.endpoints
        # Spread clients over endpoints; failover walks the list from there.
        self.producer = PipelinedProducer(
            [endpoints[(number + i) % len(endpoints)] for i in range(len(endpoints))],
            name=f"load-{run_id}-{number}", context=context, window=options.window,
            timeout_ms=options.timeout_ms, retries=options.retries)
        self._payloads = PayloadMaker(options.size, number)
        self._id_prefix = f"{run_id}-"
        self._rate = options.rate / options.clients if options.rate else 0.0
        batch = options.batch
        if self._rate:
            batch = max(1, min(batch, int(self._rate * PACE_WINDOW_S)))
        self._batch = batch
        self._began = began
        self.submitted = 0

    def _records(self, start: int, n: int) -> list[OutRecord]:
        keys, prefix = self.options.keys, self._id_prefix
        seqs = range(start, start + n)
        key_column = [f"key-{seq % keys}" for seq in seqs] if keys else repeat(None)
        # tuple.__new__ builds the NamedTuples in C (OutRecord(...) is a Python call)
        return list(map(tuple.__new__, repeat(OutRecord), zip(
            self._payloads.many(start, n), [f"{prefix}{seq}" for seq in seqs], key_column,
            repeat(time.time()))))

    def next_send(self) -> float | None:
        """When this client sends its next batch (its pace), None when it sends no more."""
        if self.submitted >= self.count or self.producer.unavailable:
            return None
        if not self._rate:
            return self._began
        return self._began + self.submitted / self._rate

    def fill(self, now: float) -> int:
        """Send batches while the window has room and the pace allows; how many records."""
        sent = 0
        producer = self.producer
        while producer.free and now < self.deadline:
            due = self.next_send()
            if due is None or due > now:
                break
            n = min(self._batch, self.count - self.submitted)
            first = self.first_seq + self.submitted
            producer.submit(self._records(first, n), first, now=now, deadline=self.deadline)
            self.submitted += n
            sent += n
        self.result.sent += sent
        return sent

    def complete(self, done: list[Completion]) -> tuple[int, int]:
        """Account for finished requests: (records acknowledged, records refused)."""
        result = self.result
        acked_total = refused_total = 0
        for completion in done:
            first, outcome, n = completion.token, completion.outcome, len(completion.records)
            created = completion.records[0].created_at
            for refusal in outcome.refusals:
                result.refuse(refusal.code, refusal.reason, 1)
            if not outcome.refusals:
                result.acked_runs.append((first, n, created))
                count = n
            else:
                acked = outcome.acked_indices()
                result.acked_runs.extend((first + i, c, created) for i, c in proto.to_runs(acked))
                count = len(acked)
            if count:
                result.latencies.append((completion.latency_s, count))
            acked_total += count
            refused_total += len(outcome.refusals)
        result.acked += acked_total
        return acked_total, refused_total

    def finished(self, now: float) -> bool:
        """Nothing in flight, and nothing more to send (or the deadline passed)."""
        return not self.producer.in_flight and (now >= self.deadline or self.next_send() is None)

    def wake_at(self, now: float) -> float | None:
        """The next time this client has something to do without an answer arriving."""
        times = [self.producer.next_due()]
        if self.producer.free and now < self.deadline:
            times.append(self.next_send())
        return min((t for t in times if t is not None), default=None)


def _retries(stats: Mapping[str, int]) -> int:
    return stats.get("backpressure_retries", 0) + stats.get("resends", 0)


def run_load(options: LoadOptions, *, progress: Callable[[Progress], None] | None = None,
             progress_interval_s: float = 0.1, stop: threading.Event | None = None,
             run_id: str | None = None,
             context: zmq.Context[Any] | None = None) -> LoadReport:
    """Send ``options.records`` records and return what happened to them.

    One thread, one poller: the ``options.clients`` clients are connections, each with up to
    ``options.window`` requests in flight (``PipelinedProducer``), served by this loop. It
    ends when every client is done, at the deadline plus the tries of what is still in flight,
    or when ``stop`` is set (KeyboardInterrupt sets it), with ``interrupted`` in the report.
    ``progress`` is called about every ``progress_interval_s``. A ``context`` given by the
    caller (needed for ``inproc://`` endpoints) is left open; one made here is terminated.
    """
    stop = stop or threading.Event()
    run_id = run_id or uuid.uuid4().hex[:12]
    report = LoadReport(options, run_id, records=options.records)
    own_context = context is None
    context = zmq.Context() if context is None else context
    began = time.monotonic()
    deadline = began + options.deadline_s
    share, extra = divmod(options.records, options.clients)
    clients: list[_Client] = []
    first = 0
    try:
        for number in range(options.clients):
            count = share + (1 if number < extra else 0)
            if count:
                clients.append(_Client(number, count, first, options, run_id, context, began,
                                       deadline))
            first += count
        _drive(clients, report, options, stop, progress, progress_interval_s, began, deadline)
    finally:
        for client in clients:
            client.producer.close()
        if own_context:
            context.term()
    return report


def _drive(clients: list[_Client], report: LoadReport, options: LoadOptions,
           stop: threading.Event, progress: Callable[[Progress], None] | None,
           progress_interval_s: float, began: float, deadline: float) -> None:
    """The load's one loop: send what the windows and paces allow, read answers, resend."""
    # Past the deadline nothing new goes out; what is in flight gets its tries (bounded).
    hard_stop = deadline + (options.retries + 1) * options.timeout_ms / 1000 * 2 + 5
    sent = acked = refused = 0
    poller = zmq.Poller()
    by_socket: dict[zmq.Socket[Any], _Client] = {}
    next_progress = began

    def show(now: float) -> None:
        retried = sum(_retries(c.producer.stats) + c.producer.stats["failovers"]
                      for c in clients)
        if progress is not None:
            progress(Progress(options.records, sent, acked, refused, retried, now - began))

    try:
        while not stop.is_set():
            now = time.monotonic()
            active = [c for c in clients if not c.finished(now)]
            if not active or now >= hard_stop:
                break
            for client in active:
                sent += client.fill(now)
            sockets = {c.producer.socket: c for c in active if c.producer.socket is not None}
            if sockets.keys() != by_socket.keys():  # a failover replaced a socket
                poller = zmq.Poller()
                for sock in sockets:
                    poller.register(sock, zmq.POLLIN)
                by_socket = sockets
            wake = min((t for t in (c.wake_at(now) for c in active) if t is not None),
                       default=now + progress_interval_s)
            wake = min(wake, next_progress + progress_interval_s, hard_stop)
            events = poller.poll(max(0, math.ceil((wake - now) * 1000))) if by_socket else []
            now = time.monotonic()
            for sock, _ in events:
                client = by_socket[sock]
                a, r = client.complete(client.producer.handle_replies(now))
                acked, refused = acked + a, refused + r
            for client in active:
                if (due := client.producer.next_due()) is not None and due <= now:
                    a, r = client.complete(client.producer.tick(now))
                    acked, refused = acked + a, refused + r
            if now >= next_progress + progress_interval_s:
                next_progress = now
                show(now)
    except KeyboardInterrupt:
        stop.set()
    now = time.monotonic()
    report.seconds = now - began
    if stop.is_set() or any(c.producer.in_flight for c in clients):
        report.interrupted = True  # what was in flight has no known outcome
    show(now)
    latencies: list[tuple[float, int]] = []
    for client in clients:
        result, stats = client.result, client.producer.stats
        report.sent += result.sent
        report.acked += result.acked
        report.acked_runs.extend(result.acked_runs)
        report.refused += result.refused
        report.failovers += stats["failovers"]
        for code, entry in result.refusals.items():
            merged = report.refusals.setdefault(code, {"count": 0, "reason": entry["reason"]})
            merged["count"] += entry["count"]
        report.retried += _retries(stats) + stats["failovers"]
        report.acked_duplicate += stats["duplicates"]
        latencies.extend(result.latencies)
    latencies.sort()
    report.ack_latencies = latencies


# -- verification ------------------------------------------------------------------------------
def _seconds(created: datetime, stored: datetime) -> float:
    if created.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        created = created.replace(tzinfo=UTC)
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=UTC)
    return (stored - created).total_seconds()


def verify(db_url: str, acked_ids: Collection[str],
           created_times: Mapping[str, float] | None = None, timeout_s: float = 30.0, *,
           prefix: str | None = None, poll_s: float = 0.2,
           stop: threading.Event | None = None) -> VerifyReport:
    """Wait (at most ``timeout_s``) until every acknowledged id is stored, then account for all.

    ``prefix`` limits the check to this run's ids (``LoadReport.prefix``), so earlier runs in
    the same database are neither "unexpected" nor slow to read. ``created_times`` (id to the
    client's creation time) is used for end-to-end latency when a row's ``created_at`` column
    is missing; normally the columns are used, because they are what the consumer stored.
    """
    stop = stop or threading.Event()
    expected = set(acked_ids)
    report = VerifyReport(expected=len(expected))
    engine = make_engine(db_url)
    began = time.monotonic()
    deadline = began + timeout_s
    try:
        ids_where = RECORDS.c.id.startswith(prefix) if prefix else None
        count_query = select(func.count()).select_from(RECORDS)
        if ids_where is not None:
            count_query = count_query.where(ids_where)
        while True:
            with engine.connect() as conn:
                stored = int(conn.execute(count_query).scalar_one())
            if stored >= len(expected):
                rows = _rows(engine, prefix)
                if expected <= rows.keys():
                    break
            if time.monotonic() >= deadline or stop.is_set():
                report.timed_out = True
                rows = _rows(engine, prefix)
                break
            stop.wait(poll_s)  # a short pause between polls of the database
        dead = _dead_ids(engine, prefix)
    finally:
        engine.dispose()
    report.waited_s = time.monotonic() - began
    created_times = created_times or {}
    latencies: list[float] = []
    first: datetime | None = None
    last: datetime | None = None
    for record_id, (created, stored_at, consumer, partition) in rows.items():
        report.by_consumer[consumer] = report.by_consumer.get(consumer, 0) + 1
        report.by_partition[partition] = report.by_partition.get(partition, 0) + 1
        if record_id not in expected:
            report.unexpected += 1
            continue
        report.persisted += 1
        if created is not None and stored_at is not None:
            latencies.append(_seconds(created, stored_at))
            first = created if first is None else min(first, created)
            last = stored_at if last is None else max(last, stored_at)
        elif record_id in created_times and stored_at is not None:
            latencies.append(_seconds(datetime.fromtimestamp(created_times[record_id], UTC),
                                      stored_at))
    missing = expected - rows.keys()
    report.dead_lettered = len(missing & dead)
    lost = missing - dead
    report.lost = len(lost)
    report.missing_sample = sorted(lost)[:10]
    report.duplicates = len(dead & rows.keys())
    report.unexpected += len(dead - expected)
    latencies.sort()
    report.e2e_s = latencies
    if first is not None and last is not None:
        report.span_s = _seconds(first, last)
    report.by_consumer = dict(sorted(report.by_consumer.items()))
    report.by_partition = dict(sorted(report.by_partition.items()))
    return report


def _rows(engine: Any, prefix: str | None) -> dict[str, tuple[Any, Any, str, int]]:
    query = select(RECORDS.c.id, RECORDS.c.created_at, RECORDS.c.stored_at, RECORDS.c.consumer,
                   RECORDS.c.partition)
    if prefix:
        query = query.where(RECORDS.c.id.startswith(prefix))
    with engine.connect() as conn:
        return {row[0]: (row[1], row[2], row[3], row[4]) for row in conn.execute(query)}


def _dead_ids(engine: Any, prefix: str | None) -> set[str]:
    query = select(DEAD_LETTERS.c.id)
    if prefix:
        query = query.where(DEAD_LETTERS.c.id.startswith(prefix))
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(query)}
