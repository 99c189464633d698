"""A consumer node: a DEALER identified by its port, a database worker, a status endpoint.

The socket thread owns the DEALER, the heartbeats and the status ROUTER; database work runs on
a worker thread fed through a ``queue.Queue`` and answering through an inproc PAIR doorbell, so
a slow or stuck transaction never starves the heartbeats and the broker never declares a busy
consumer dead. Records are acknowledged only after their transaction committed.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import zmq

from zmqlab import protocol as proto
from zmqlab.config import ConsumerConfig
from zmqlab.errors import ErrorCode, ProtocolError, ZmqlabError
from zmqlab.node import (
    NOBLOCK,
    Handler,
    Node,
    bind,
    new_socket,
    recv_frames,
    send_frames,
    serve_requests,
)
from zmqlab.protocol import Command
from zmqlab.store import Batch, Delivery, Records, Sink, check_url, load_transform

MAX_RECORDS_PER_TRANSACTION = 5000
RECORD_COLUMNS = ("ids", "keys", "producers", "created_us", "attempts", "sizes")
LEASE_CODES = frozenset({ErrorCode.STALE_EPOCH, ErrorCode.NOT_OWNER, ErrorCode.UNKNOWN_OFFSET})

BrokerHandler = Callable[[proto.Message], None]  # a message from the broker; no reply


@dataclass(slots=True)
class Result:
    """A batch the worker finished: every record stored, already there, or dead-lettered."""

    batch: Batch
    inserted: int
    duplicates: int
    dead: list[int]  # offsets dead-lettered instead of stored


class Consumer(Node):
    kind = "consumer"

    def __init__(self, config: ConsumerConfig, *, context: zmq.Context[Any] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sink_factory: Callable[[], Sink] | None = None) -> None:
        super().__init__(context)
        self.config = config
        self.clock = clock
        check_url(config.db_url)
        transform = load_transform(config.transform) if config.transform else None
        self.sink_factory = sink_factory or (
            lambda: Sink.open(config.db_url, config.name, config.max_attempts, transform))
        self._jobs: queue.Queue[Batch | None] = queue.Queue()
        self._results: queue.Queue[Result | SinkHealth] = queue.Queue()
        self._bell_endpoint = f"inproc://zmqlab-consumer-bell-{uuid.uuid4().hex}"
        self._stopping = threading.Event()
        # Socket-thread state (the worker never touches it).
        self.session = 0
        self.registered = False
        self.assigned: list[int] = []
        self.outstanding = 0  # batches handed to the worker and not yet finished
        self.outstanding_records = 0
        self.stats = {"received": 0, "inserted": 0, "duplicates": 0, "dead": 0, "acked": 0,
                      "refused_acks": 0, "registrations": 0, "sink_errors": 0,
                      "heartbeats": 0}
        self.sink_error: str | None = None
        self._dealer: zmq.Socket[Any] | None = None
        self._last_heard = 0.0
        self._worker_health: str | None = None  # the worker thread's own copy
        # One dispatch table per socket. From the broker, HEARTBEAT and anything unexpected
        # need no handler: hearing from it at all is what counts.
        self._broker_handlers: dict[Command, BrokerHandler] = {
            Command.RECORDS: self._handle_records,
            Command.WELCOME: self._handle_welcome,
            Command.ASSIGN: self._handle_assign,
            Command.ERR: self._handle_err,
        }
        self._status_handlers: dict[Command, Handler] = {Command.STATS: self._handle_stats}

    # -- socket thread -----------------------------------------------------------------------
    def serve(self, control: zmq.Socket[Any]) -> None:
        bell = new_socket(self.context, zmq.PAIR)
        bell.bind(self._bell_endpoint)
        status = None
        worker = threading.Thread(target=self._work, name=f"zmqlab-db-{self.config.name}",
                                  daemon=True)
        try:
            if self.config.status is not None:
                status = new_socket(self.context, zmq.ROUTER)
                bind(status, self.config.status, f"consumer {self.config.name} status")
            worker.start()
            self._connect()
            self.log.info("consumer %s connected to %s, database %s", self.config.name,
                          self.config.broker, _safe_url(self.config.db_url))
            self.bound()
            self._loop(control, bell, status)
            self._drain(bell)
        finally:
            self._stopping.set()
            self._jobs.put(None)
            worker.join(self.config.drain_timeout_s + 5)
            if self._dealer is not None:
                self._dealer.close(0)
            if status is not None:
                status.close(0)
            bell.close(0)

    def _connect(self) -> None:
        """(Re)open the DEALER with our identity and say HELLO; the broker's HANDOVER lets the
        new connection take over the identity from a dead one."""
        if self._dealer is not None:
            self._dealer.close(0)
        self._dealer = new_socket(self.context, zmq.DEALER,
                                  identity=self.config.name.encode(), sndhwm=0)
        self._dealer.connect(self.config.broker)
        self._hello()

    def _hello(self) -> None:
        self.registered = False
        self.session += 1
        self._last_heard = self.clock()
        self._send(Command.HELLO, {"role": "consumer", "name": self.config.name})

    def _send(self, command: Command, header: dict[str, Any] | None = None) -> None:
        assert self._dealer is not None
        try:
            send_frames(self._dealer, [proto.EMPTY, *proto.encode(command, header)], NOBLOCK)
        except zmq.Again:  # no connection yet: heartbeats and re-registration recover
            self.log.debug("send %s dropped: broker not connected", command.name)

    def _loop(self, control: zmq.Socket[Any], bell: zmq.Socket[Any],
              status: zmq.Socket[Any] | None) -> None:
        tick_s = self.config.tick_ms / 1000
        heartbeat_s = self.config.heartbeat_ms / 1000
        next_heartbeat = self.clock() + heartbeat_s
        poller, polled = zmq.Poller(), None
        while True:
            if polled is not self._dealer:  # a reconnect replaced the DEALER
                poller = zmq.Poller()
                for sock in (control, bell, self._dealer, status):
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
                polled = self._dealer
            events = dict(poller.poll(int(tick_s * 1000)))
            if control in events:
                control.recv()
                return
            if self._dealer in events:
                self._read_broker()
            if bell in events:
                self._finish(bell)
            if status is not None and status in events:
                serve_requests(status, self._status_handlers, log=self.log,
                               unknown="a consumer answers STATS only", limit=64)
            now = self.clock()
            if now - self._last_heard > self.config.expiry_s:
                self.log.warning("broker silent for %.1f s: reconnecting", now - self._last_heard)
                self._connect()
            if now >= next_heartbeat:
                self._send(Command.HEARTBEAT)
                self.stats["heartbeats"] += 1
                next_heartbeat = now + heartbeat_s

    def _read_broker(self) -> None:
        assert self._dealer is not None
        for _ in range(256):
            try:
                frames = recv_frames(self._dealer, NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = self.clock()
            try:
                if not frames or frames[0] != proto.EMPTY:
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "missing empty delimiter")
                message = proto.decode(frames[1:])
                handler = self._broker_handlers.get(message.command)
                if handler is not None:
                    handler(message)
            except ProtocolError as exc:
                self.log.warning("bad message from broker: %s", exc)

    def _handle_welcome(self, _message: proto.Message) -> None:
        self.registered = True
        self.stats["registrations"] += 1
        self.log.info("registered with broker (session %d)", self.session)
        self._send(Command.FETCH, {"credit": self.config.credit})

    def _handle_assign(self, message: proto.Message) -> None:
        self.assigned = list(message.header.get("partitions", []))
        self.log.info("assigned partitions %s", [p + 1 for p in self.assigned])

    def _handle_err(self, message: proto.Message) -> None:
        code, reason, _ = proto.error_of(message)
        if code == ErrorCode.NOT_REGISTERED:
            self.log.warning("broker does not know us (%s): registering again", reason)
            self._hello()
            return
        if code in LEASE_CODES:
            self.stats["refused_acks"] += 1
        self.log.warning("broker refused: %s %s", code, reason)

    def _handle_records(self, message: proto.Message) -> None:
        """Queue each partition's records for the worker as columns (``Records``): no object
        per record on this thread, which shares the GIL with the worker's transaction."""
        entries = proto.require(message.header, "batches", list)
        parts: list[tuple[int, int, list[int], dict[str, Any]]] = []
        sizes: list[Any] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "each RECORDS batch must be an object")
            offsets = proto.from_runs(proto.require(entry, "offsets", list))
            columns = {name: proto.column(entry, name, len(offsets)) for name in RECORD_COLUMNS}
            parts.append((proto.require(entry, "partition", int),
                          proto.require(entry, "epoch", int), offsets, columns))
            sizes.extend(columns["sizes"])
        payloads = proto.split_payloads(sizes, message.payloads)
        start = 0
        for number, epoch, offsets, c in parts:
            end = start + len(offsets)
            records = Records(offsets, c["ids"], c["keys"], c["producers"], c["created_us"],
                              c["attempts"], payloads[start:end])
            start = end
            self.stats["received"] += len(offsets)
            self.outstanding += 1
            self.outstanding_records += len(offsets)
            self._jobs.put(Batch(number, epoch, session=self.session, records=records))

    def _finish(self, bell: zmq.Socket[Any]) -> None:
        """Acknowledge what the worker committed (only for the current registration)."""
        while True:
            try:
                bell.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        acks: list[dict[str, Any]] = []  # one ACK message for every batch finished by now
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                break
            if isinstance(result, SinkHealth):
                self.sink_error = result.error
                if result.error is None:
                    self.log.info("database available again")
                else:
                    self.stats["sink_errors"] += 1
                continue
            batch = result.batch
            self.outstanding -= 1
            self.outstanding_records -= len(batch)
            self.stats["inserted"] += result.inserted
            self.stats["duplicates"] += result.duplicates
            self.stats["dead"] += len(result.dead)
            if batch.session != self.session:
                continue  # released when we re-registered: the broker redelivers them
            ack: dict[str, Any] = {"partition": batch.partition, "epoch": batch.epoch,
                                   "offsets": proto.to_runs(batch.offsets)}
            if result.dead:
                ack["dead"] = result.dead
            acks.append(ack)
            self.stats["acked"] += len(batch)
        if acks:
            self._send(Command.ACK, {"acks": acks})

    def _drain(self, bell: zmq.Socket[Any]) -> None:
        """Graceful stop: take nothing new, finish and ACK what we hold, then say BYE."""
        self._send(Command.FETCH, {"credit": 0})
        deadline = self.clock() + self.config.drain_timeout_s
        poller = zmq.Poller()
        assert self._dealer is not None
        poller.register(bell, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        while self.outstanding and self.clock() < deadline:
            events = dict(poller.poll(100))
            if self._dealer in events:
                self._read_broker()
            if bell in events:
                self._finish(bell)
        if self.outstanding:
            self.log.warning("stopping with %d record(s) not stored: the broker redelivers them",
                             self.outstanding_records)
        self._send(Command.BYE)
        self.log.info("consumer %s stopped: %s", self.config.name, self.stats)

    def _handle_stats(self, _route: list[bytes], _message: proto.Message) -> list[bytes]:
        return proto.encode(Command.STATS, self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.config.name, "registered": self.registered,
                "session": self.session, "partitions": self.assigned,
                "inflight": self.outstanding_records, "broker": self.config.broker,
                "database": _safe_url(self.config.db_url),
                "last_heard_s": round(self.clock() - self._last_heard, 3),
                "sink_error": self.sink_error, **self.stats}

    # -- database worker thread ------------------------------------------------------------------
    def _work(self) -> None:
        bell = new_socket(self.context, zmq.PAIR)
        bell.connect(self._bell_endpoint)
        sink: Sink | None = None
        try:
            # Open the database now rather than on the first batch: the first records do not
            # wait for an engine and the schema check, and a database that is not there is
            # reported at start (the first batch tries again).
            try:
                sink = self.sink_factory()
            except Exception as exc:
                self._unavailable(exc, 0, None, bell)
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                # Wait for the writer's turn first, then take everything queued by then: while
                # other consumers of a SQLite file write, batches pile up here, so each
                # transaction grows with the contention instead of each consumer committing
                # its share of the flow in small ones. Only the first try holds the turn;
                # retries wait outside.
                with sink.turn() if sink is not None else nullcontext():
                    pending = self._progress(self._gather(first))
                    sink, pending = self._attempt(sink, pending, bell)
                if pending:
                    sink = self._retry(sink, pending, bell)
        finally:
            if sink is not None:
                sink.close()
            bell.close(0)

    def _gather(self, first: Batch) -> list[Batch]:
        """``first`` and whatever else is queued, up to one transaction's worth."""
        batches = [first]
        count = len(first)
        while count < MAX_RECORDS_PER_TRANSACTION:
            try:
                more = self._jobs.get_nowait()
            except queue.Empty:
                break
            if more is None:  # stopping: leave the marker for the loop
                self._jobs.put(None)
                break
            batches.append(more)
            count += len(more)
        return batches

    @staticmethod
    def _progress(batches: list[Batch]) -> list[_Progress]:
        return [_Progress(b) for b in batches]

    def _retry(self, sink: Sink | None, pending: list[_Progress],
               bell: zmq.Socket[Any]) -> Sink | None:
        """Try again with backoff until every record is settled, while the database is
        unavailable or a record fails on its own. Gives up only when the node stops:
        unacknowledged records are then redelivered."""
        delay = self.config.retry_initial_s
        while pending:
            if self._stopping.wait(delay):
                return sink
            delay = min(delay * 2, self.config.retry_max_s)
            sink, pending = self._attempt(sink, pending, bell, delay)
        return sink

    def _attempt(self, sink: Sink | None, pending: list[_Progress], bell: zmq.Socket[Any],
                 next_delay: float | None = None) -> tuple[Sink | None, list[_Progress]]:
        """One try at storing what is pending; ACK what got settled; return what is left."""
        try:
            if sink is None:
                sink = self.sink_factory()
            outcomes = sink.store([p.to_store() for p in pending])
        except Exception as exc:  # SinkUnavailable, a database that cannot be opened, a bug
            self._unavailable(exc, sum(map(len, pending)),
                              next_delay or self.config.retry_initial_s, bell)
            return sink, pending
        still: list[_Progress] = []
        done: list[Result | SinkHealth] = [SinkHealth(None)]
        for progress, outcome in zip(pending, outcomes, strict=True):
            progress.inserted += outcome.inserted
            progress.duplicates += outcome.duplicates
            progress.dead += outcome.dead
            progress.remaining = outcome.failed
            if outcome.done:
                done.append(Result(progress.batch, progress.inserted, progress.duplicates,
                                   progress.dead))
            else:  # a record failed on its own: it is tried again after a pause
                still.append(progress)
        self._post(bell, *done)
        return sink, still

    def _unavailable(self, exc: Exception, held: int, delay: float | None,
                     bell: zmq.Socket[Any]) -> None:
        if not isinstance(exc, ZmqlabError):
            self.log.error("unexpected error from the database; retrying", exc_info=exc)
        if delay is None:
            self.log.warning("database unavailable at start (tried again with the first "
                             "records): %s", exc)
        else:
            self.log.warning("database unavailable, holding %d record(s), retry in %.1f s: %s",
                             held, delay, exc)
        self._post(bell, SinkHealth(str(exc)))

    def _post(self, bell: zmq.Socket[Any], *items: Result | SinkHealth) -> None:
        """Hand results to the socket thread with one ring of the bell for all of them, because
        a transaction holds a batch per partition per RECORDS message, and a ring per batch
        would wake the socket thread, and send an ACK message, that many times."""
        posted = False
        for item in items:
            if isinstance(item, SinkHealth):  # only changes of health travel
                if item.error == self._worker_health:
                    continue
                self._worker_health = item.error
            self._results.put(item)
            posted = True
        if posted:
            bell.send(b"")


@dataclass(slots=True)
class _Progress:
    batch: Batch
    remaining: list[Delivery] | None = None  # None: every record, untried
    inserted: int = 0
    duplicates: int = 0
    dead: list[int] = field(default_factory=list)

    def to_store(self) -> Batch:
        """What is still to store: the batch itself at first (its columns, the hot path),
        then the deliveries that failed."""
        if self.remaining is None:
            return self.batch
        return Batch(self.batch.partition, self.batch.epoch, self.remaining, self.batch.session)

    def __len__(self) -> int:
        return len(self.batch) if self.remaining is None else len(self.remaining)


@dataclass(slots=True)
class SinkHealth:
    """The worker's word on the database: an error text, or None once it works again."""

    error: str | None


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs and status."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
