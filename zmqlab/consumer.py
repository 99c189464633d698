"""A consumer node: a DEALER identified by its port, a database worker, a status endpoint.

The socket thread owns the DEALER, the heartbeats and the status ROUTER; database work runs on
a worker thread fed through a ``queue.Queue`` and answering through an inproc PAIR doorbell, so
a slow or stuck transaction never starves the heartbeats and the broker never declares a busy
consumer dead. Records are acknowledged only after their transaction committed.

The consumer runs one session at a time with the broker (docs/sessions.md): WELCOME names it
and sets the timing; every message either way names it and is numbered. A gap in the broker's
numbering, or a broker silent for ``heartbeat × liveness``, ends the session: the consumer
says HELLO with ``previous``, drops the batches of the old session it has not started, and
never acknowledges one of them in the new session (the broker delivers them again).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
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
MAX_STUCK_SHOWN = 10  # stuck records listed in a status snapshot (all are counted)
RECORD_COLUMNS = ("ids", "keys", "producers", "created_us", "attempts", "sizes")
LEASE_CODES = frozenset({ErrorCode.STALE_EPOCH, ErrorCode.NOT_OWNER, ErrorCode.UNKNOWN_OFFSET})

BrokerHandler = Callable[[proto.Message], None]  # a message from the broker; no reply


class Standing(Enum):
    """The consumer's standing with the broker (docs/sessions.md)."""

    WAITING = "waiting"  # HELLO sent, no WELCOME yet: nothing but HELLO may be sent
    REGISTERED = "registered"  # in a session: every message carries session, seq, seen


@dataclass(slots=True)
class Result:
    """A batch the worker finished: every record stored, already there, dead-lettered or
    stuck; or dropped unstored because its session or epoch ended before it was started."""

    batch: Batch
    inserted: int
    duplicates: int
    dead: list[int]  # offsets dead-lettered instead of stored
    stuck: list[Delivery] = field(default_factory=list)  # stored nowhere: never acknowledged
    dropped: bool = False


@dataclass(frozen=True, slots=True)
class Stuck:
    """A record the database refused in ``records`` and in ``dead_letters``."""

    id: str
    epoch: int
    error: str


class Fence:
    """Which batches are not worth starting: the socket thread moves the fence when a session
    ends or the broker releases a partition (ACK_TIMEOUT); the worker asks before it starts a
    batch. The broker redelivers whatever was released, so storing the old copy first would
    only delay the copy whose ACK counts. The lock lives here, held for a line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._session = ""
        self._epochs: dict[int, int] = {}  # partition -> the lowest epoch still worth storing

    def open(self, session: str) -> None:
        """Batches of ``session`` count from now on, and no others ("" for none)."""
        with self._lock:
            self._session = session
            self._epochs = {}

    def raise_epoch(self, partition: int, epoch: int) -> None:
        with self._lock:
            self._epochs[partition] = max(epoch, self._epochs.get(partition, 0))

    def passed(self, batch: Batch) -> bool:
        """Whether ``batch`` was delivered before its session ended or its epoch was fenced."""
        with self._lock:
            return (batch.session != self._session
                    or batch.epoch < self._epochs.get(batch.partition, 0))


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
        self._fence = Fence()
        self._bell_endpoint = f"inproc://zmqlab-consumer-bell-{uuid.uuid4().hex}"
        self._stopping = threading.Event()
        # Socket-thread state (the worker never touches it).
        self.standing = Standing.WAITING
        self.session: str | None = None  # the broker's token for this registration
        self._leaving: str | None = None  # the session a reset left, until the next WELCOME
        self._seq = 0  # messages sent in this session
        self._seen = 0  # the broker's last seq received in this session
        # Timing comes from the broker's WELCOME (one truth for both sides); the consumer's
        # own settings only serve until the first one.
        self.heartbeat_ms = config.heartbeat_ms
        self.liveness = config.liveness
        self._next_heartbeat = 0.0
        self._credit = config.credit
        self.assigned: list[int] = []
        self.outstanding = 0  # batches handed to the worker and not yet finished
        self.outstanding_records = 0
        self.stuck: dict[tuple[int, int], Stuck] = {}  # (partition, offset) -> why
        self.stats = {"received": 0, "inserted": 0, "duplicates": 0, "dead": 0, "acked": 0,
                      "refused_acks": 0, "registrations": 0, "resets": 0, "sink_errors": 0,
                      "heartbeats": 0, "dropped": 0, "stuck": 0, "ack_timeouts": 0,
                      "stale_messages": 0}
        self._sink_health: str | None = None
        self.last_sink_error: str | None = None
        self._dealer: zmq.Socket[Any] | None = None
        self._last_heard = 0.0
        self._worker_health: str | None = None  # the worker thread's own copy
        # One dispatch table per socket. From the broker, HEARTBEAT and anything unexpected
        # need no handler: hearing from it in sequence is what counts.
        self._broker_handlers: dict[Command, BrokerHandler] = {
            Command.RECORDS: self._handle_records,
            Command.WELCOME: self._handle_welcome,
            Command.ASSIGN: self._handle_assign,
            Command.ERR: self._handle_err,
        }
        self._err_handlers: dict[str, BrokerHandler] = {
            ErrorCode.NOT_REGISTERED: self._handle_not_registered,
            ErrorCode.ACK_TIMEOUT: self._handle_ack_timeout,
        }
        self._status_handlers: dict[Command, Handler] = {Command.STATS: self._handle_stats}

    @property
    def registered(self) -> bool:
        return self.standing is Standing.REGISTERED

    @property
    def expiry_s(self) -> float:
        """How long the broker may be silent before the session is given up."""
        return self.heartbeat_ms * self.liveness / 1000

    @property
    def sink_error(self) -> str | None:
        """What keeps records from being stored now: the database's error, or the records
        stored nowhere; None when all is well."""
        if self._sink_health is not None:
            return self._sink_health
        if not self.stuck:
            return None
        (partition, offset), first = next(iter(self.stuck.copy().items()))
        return (f"{len(self.stuck)} record(s) stored neither in records nor in dead_letters, "
                f"left unacknowledged; first: id={first.id!r} partition={partition} "
                f"offset={offset}: {first.error}")

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
            self._connect(None)
            self.log.info("consumer %s connected to %s, database %s", self.config.name,
                          self.config.broker, _safe_url(self.config.db_url))
            self.bound()
            self._loop(control, bell, status)
            self._drain(bell)
        finally:
            self._stopping.set()
            self._jobs.put(None)
            if worker.is_alive():  # not started when the status port could not be bound
                worker.join(self.config.drain_timeout_s + 5)
            if self._dealer is not None:
                self._dealer.close(0)
            if status is not None:
                status.close(0)
            bell.close(0)

    def _connect(self, previous: str | None) -> None:
        """(Re)open the DEALER with our identity and say HELLO; the broker's HANDOVER lets the
        new connection take over the identity from a dead one."""
        if self._dealer is not None:
            self._dealer.close(0)
        self._dealer = new_socket(self.context, zmq.DEALER,
                                  identity=self.config.name.encode())
        self._dealer.connect(self.config.broker)
        self._hello(previous)

    def _hello(self, previous: str | None) -> None:
        """Register: a fresh start, or (``previous``) leaving a session we still ran, which
        the broker must not count against the records' attempts."""
        header: dict[str, Any] = {"role": "consumer", "name": self.config.name}
        if previous is not None:
            header["previous"] = previous
        self.standing = Standing.WAITING
        self.session = None
        self._leaving = previous
        self._seq = self._seen = 0
        self.assigned = []  # forget what we were told we hold: the broker says it again
        self._fence.open("")
        self._last_heard = self.clock()
        self._send(Command.HELLO, header)

    def _reset(self, why: str, *, reconnect: bool = False) -> None:
        """Leave the current session (or the one a pending HELLO leaves) and register again;
        whatever it delivered is released by the broker and delivered anew."""
        previous = self.session or self._leaving
        if previous is not None:
            self.stats["resets"] += 1
        if previous is None:
            self.log.warning("%s: saying HELLO again", why)
        else:
            self.log.warning("%s: leaving session %s and registering again", why,
                             _short(previous))
        if reconnect:
            self._connect(previous)
        else:
            self._hello(previous)

    def _send(self, command: Command, header: dict[str, Any] | None = None) -> bool:
        """Send one message; every one but HELLO names the session and is numbered, so it is
        not sent before WELCOME. Whether it went out."""
        assert self._dealer is not None
        body = header or {}
        if command is not Command.HELLO:
            if self.session is None:
                self.log.debug("%s not sent: not registered", command.name)
                return False
            body = {**body, "session": self.session, "seq": self._seq + 1, "seen": self._seen}
        try:
            send_frames(self._dealer, [proto.EMPTY, *proto.encode(command, body)], NOBLOCK)
        except zmq.Again:  # no connection yet: the numbering must not count it
            self.log.debug("send %s dropped: broker not connected", command.name)
            return False
        if command is not Command.HELLO:
            self._seq += 1
        return True

    def _loop(self, control: zmq.Socket[Any], bell: zmq.Socket[Any],
              status: zmq.Socket[Any] | None) -> None:
        tick_ms = self.config.tick_ms
        poller, polled = zmq.Poller(), None
        while True:
            if polled is not self._dealer:  # a reconnect replaced the DEALER
                poller = zmq.Poller()
                for sock in (control, bell, self._dealer, status):
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
                polled = self._dealer
            events = dict(poller.poll(tick_ms))
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
            self.tick(self.clock())

    def tick(self, now: float) -> None:
        """Timers: give up a silent broker's session; heartbeat in ours."""
        silent = now - self._last_heard
        if silent > self.expiry_s:
            self._reset(f"broker silent for {silent:.1f} s (heartbeat {self.heartbeat_ms} ms "
                        f"x liveness {self.liveness})", reconnect=True)
            return
        if self.registered and now >= self._next_heartbeat:
            self._send(Command.HEARTBEAT)
            self.stats["heartbeats"] += 1
            self._next_heartbeat = now + self.heartbeat_ms / 1000

    def _read_broker(self) -> None:
        assert self._dealer is not None
        dealer = self._dealer
        for _ in range(256):
            if self._dealer is not dealer:
                return  # a reset reconnected: what the old socket held is gone with it
            try:
                frames = recv_frames(dealer, NOBLOCK)
            except zmq.Again:
                return
            try:
                if not frames or frames[0] != proto.EMPTY:
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "missing empty delimiter")
                message = proto.decode(frames[1:])
                if not self._in_sequence(message):
                    continue
                self._last_heard = self.clock()
                handler = self._broker_handlers.get(message.command)
                if handler is not None:
                    handler(message)
            except ProtocolError as exc:
                self.log.warning("bad message from broker: %s", exc)

    def _in_sequence(self, message: proto.Message) -> bool:
        """Whether to act on ``message``: a WELCOME, a message of the current session that is
        the next in its numbering, or an unnumbered ERR (the answer to a message that named no
        session, or the broker ending ours). A message of an older session is ignored; a gap
        in the numbering means one was lost: reset."""
        header = message.header
        if message.command is Command.WELCOME:
            session = header.get("session")
            if isinstance(session, str) and session:
                return True
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "WELCOME without a session")
        session = header.get("session")
        if session is None and message.command is Command.ERR:
            return True  # an answer to a message that named no session
        if session is None or session != self.session:
            self.stats["stale_messages"] += 1
            self.log.debug("ignored %s of session %s (ours: %s)", message.command.name,
                           _short(session), _short(self.session))
            return False
        seq = header.get("seq")
        if seq is None and message.command is Command.ERR:
            return True  # outside the numbering: the broker ended the session
        if type(seq) is not int or seq != self._seen + 1:
            self._reset(f"broker message {seq!r} after {self._seen}: one was lost")
            return False
        self._seen = seq
        return True

    def _handle_welcome(self, message: proto.Message) -> None:
        header = message.header
        self.session = str(header["session"])
        self.standing = Standing.REGISTERED
        self._leaving = None
        self._seq = self._seen = 0
        self._fence.open(self.session)
        self.stuck.clear()  # the broker released them with the old session; they come again
        heartbeat_ms, liveness = header.get("heartbeat_ms"), header.get("liveness")
        if type(heartbeat_ms) is int and heartbeat_ms > 0 and type(liveness) is int \
                and liveness > 0:
            self.heartbeat_ms, self.liveness = heartbeat_ms, liveness
        else:
            self.log.warning("WELCOME without valid heartbeat_ms/liveness: keeping %d ms x %d",
                             self.heartbeat_ms, self.liveness)
        self.stats["registrations"] += 1
        self.log.info("registered with broker (session %s, heartbeat %d ms x %d)",
                      _short(self.session), self.heartbeat_ms, self.liveness)
        self._send(Command.FETCH, {"credit": self._credit})
        self._next_heartbeat = self.clock() + self.heartbeat_ms / 1000

    def _handle_assign(self, message: proto.Message) -> None:
        self.assigned = list(message.header.get("partitions", []))
        self.log.info("assigned partitions %s", [p + 1 for p in self.assigned])

    def _handle_err(self, message: proto.Message) -> None:
        code, reason, _ = proto.error_of(message)
        handler = self._err_handlers.get(code)
        if handler is not None:
            handler(message)
            return
        if code in LEASE_CODES:  # the ACK changed nothing; the broker redelivers
            self.stats["refused_acks"] += 1
        self.log.warning("broker refused: %s %s", code, reason)

    def _handle_not_registered(self, message: proto.Message) -> None:
        if not self.registered:
            return  # our HELLO is on its way
        self._reset(f"broker ended the session ({proto.error_of(message)[1]})")

    def _handle_ack_timeout(self, message: proto.Message) -> None:
        """The broker released a partition's records in flight here and fenced it with a
        new epoch: batches of an older epoch not started yet are dropped; an ACK of one
        already being stored is refused STALE_EPOCH when it comes (and changes nothing)."""
        partition = proto.require(message.header, "partition", int)
        epoch = proto.require(message.header, "epoch", int)
        self.stats["ack_timeouts"] += 1
        self._fence.raise_epoch(partition, epoch)
        for where in [k for k, v in self.stuck.items() if k[0] == partition and v.epoch < epoch]:
            del self.stuck[where]
        self.log.warning("broker released partition %d (ACK_TIMEOUT, now epoch %d): %s",
                         partition, epoch, proto.error_of(message)[1])

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
        session = self.session or ""
        for number, epoch, offsets, c in parts:
            end = start + len(offsets)
            records = Records(offsets, c["ids"], c["keys"], c["producers"], c["created_us"],
                              c["attempts"], payloads[start:end])
            start = end
            self.stats["received"] += len(offsets)
            self.outstanding += 1
            self.outstanding_records += len(offsets)
            self._jobs.put(Batch(number, epoch, session=session, records=records))

    def _finish(self, bell: zmq.Socket[Any]) -> None:
        """Acknowledge what the worker settled (only for the current session), except the
        records stored nowhere, which stay in flight at the broker."""
        while True:
            try:
                bell.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        settled: dict[tuple[int, int], tuple[list[int], list[int]]] = {}  # offsets, dead
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                break
            if isinstance(result, SinkHealth):
                self._health(result.error)
                continue
            batch = result.batch
            self.outstanding -= 1
            self.outstanding_records -= len(batch)
            if result.dropped:
                self.stats["dropped"] += len(batch)
                continue
            self.stats["inserted"] += result.inserted
            self.stats["duplicates"] += result.duplicates
            self.stats["dead"] += len(result.dead)
            if batch.session != self.session:
                continue  # released when the session ended: the broker redelivers them
            offsets = batch.offsets
            if self.stuck:
                for offset in offsets:
                    self.stuck.pop((batch.partition, offset), None)
            if result.stuck:
                offsets = self._hold_stuck(batch, result.stuck)
            if not offsets:
                continue
            done, dead = settled.setdefault((batch.partition, batch.epoch), ([], []))
            done += offsets
            dead += result.dead
            self.stats["acked"] += len(offsets)
        for acks in _ack_messages(settled):
            self._send(Command.ACK, {"acks": acks})

    def _hold_stuck(self, batch: Batch, stuck: list[Delivery]) -> list[int]:
        """Keep records stored nowhere out of the ACK and say so; the offsets to ACK."""
        held = {d.offset for d in stuck}
        for d in stuck:
            self.stuck[(batch.partition, d.offset)] = Stuck(d.id, batch.epoch, d.last_error)
        self.stats["stuck"] += len(stuck)
        self.last_sink_error = self.sink_error
        self.log.error("partition %d: %d record(s) stored nowhere and left unacknowledged "
                       "(they stay in flight at the broker; the consumer goes on): %s",
                       batch.partition, len(stuck),
                       "; ".join(f"id={d.id!r} offset={d.offset}: {d.last_error}"
                                 for d in stuck[:MAX_STUCK_SHOWN]))
        return [o for o in batch.offsets if o not in held]

    def _health(self, error: str | None) -> None:
        self._sink_health = error
        if error is None:
            self.log.info("database available again")
        else:
            self.stats["sink_errors"] += 1
            self.last_sink_error = error

    def _drain(self, bell: zmq.Socket[Any]) -> None:
        """Graceful stop: take nothing new, finish and ACK what we hold, then say BYE."""
        self._credit = 0  # also for a session that a reset opens meanwhile
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
        stuck = [{"partition": p, "offset": o, "id": s.id, "error": s.error}
                 for (p, o), s in list(self.stuck.copy().items())[:MAX_STUCK_SHOWN]]
        return {"name": self.config.name, "registered": self.registered,
                "session": _short(self.session), "partitions": self.assigned,
                "inflight": self.outstanding_records, "broker": self.config.broker,
                "database": _safe_url(self.config.db_url),
                "heartbeat_ms": self.heartbeat_ms, "liveness": self.liveness,
                "last_heard_s": round(self.clock() - self._last_heard, 3),
                "sink_error": self.sink_error, "last_sink_error": self.last_sink_error,
                "stuck_records": stuck, **self.stats}

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
                    pending = self._current(self._progress(self._gather(first)), bell)
                    if pending:
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
        unavailable or a record fails on its own. Gives up a batch when its session or epoch
        ended (the broker redelivers it), all of them when the node stops: unacknowledged
        records are then redelivered."""
        delay = self.config.retry_initial_s
        while pending:
            if self._stopping.wait(delay):
                return sink
            pending = self._current(pending, bell)
            if not pending:
                return sink
            delay = min(delay * 2, self.config.retry_max_s)
            sink, pending = self._attempt(sink, pending, bell, delay)
        return sink

    def _current(self, pending: list[_Progress], bell: zmq.Socket[Any]) -> list[_Progress]:
        """``pending`` without the batches the fence has passed by (reported as dropped)."""
        keep: list[_Progress] = []
        passed: list[Result | SinkHealth] = []
        for p in pending:
            if self._fence.passed(p.batch):
                passed.append(Result(p.batch, p.inserted, p.duplicates, p.dead, p.stuck,
                                     dropped=True))
            else:
                keep.append(p)
        self._post(bell, *passed)
        return keep

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
            progress.stuck += outcome.stuck
            progress.remaining = outcome.failed
            if outcome.done:
                done.append(Result(progress.batch, progress.inserted, progress.duplicates,
                                   progress.dead, progress.stuck))
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
    stuck: list[Delivery] = field(default_factory=list)

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


def _ack_messages(settled: dict[tuple[int, int], tuple[list[int], list[int]]]
                  ) -> list[list[dict[str, Any]]]:
    """ACK entries for what the worker settled, one per partition and epoch, and at most one
    per partition in a message (the broker refuses an ACK naming more entries than it has
    partitions): one message, unless a partition finished batches of two epochs."""
    messages: list[list[dict[str, Any]]] = []
    for (partition, epoch), (offsets, dead) in sorted(settled.items()):
        entry: dict[str, Any] = {"partition": partition, "epoch": epoch,
                                 "offsets": proto.to_runs(sorted(offsets))}
        if dead:
            entry["dead"] = sorted(dead)
        for acks in messages:
            if all(a["partition"] != partition for a in acks):
                acks.append(entry)
                break
        else:
            messages.append([entry])
    return messages


def _short(session: object) -> str | None:
    """A session token as logs and status show it (a prefix is enough to tell them apart)."""
    return session[:8] if isinstance(session, str) else None


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs and status."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
