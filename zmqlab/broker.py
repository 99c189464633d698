"""The queue service: partitioned ring buffers between a producer ROUTER and a consumer ROUTER.

One thread, one poller, one handler per command, timers after the poll (the Majordomo
broker's shape). Handlers never touch sockets: they append replies to an outbox that the loop
flushes, so tests drive ``handle_frontend``/``handle_backend``/``tick`` with fake time and
frames and read the outbox.

A record enters a partition on PUT (and only then is the producer acknowledged), is handed to
the partition's owner when that consumer has credit, and leaves the partition only on the
owner's ACK for the current epoch.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import zmq

from zmqlab import protocol as proto
from zmqlab.assignment import consumer_order, round_robin
from zmqlab.config import REPLY_TIMEOUT_MS, BrokerConfig
from zmqlab.errors import ErrorCode, ProtocolError, Refused, ReplyError
from zmqlab.node import NOBLOCK, Node, bind, new_socket, recv_frames, send_frames
from zmqlab.partition import Partition, Taken
from zmqlab.protocol import Command

FRONT = "frontend"
BACK = "backend"
MAX_ID_CHARS = 128
MAX_KEY_CHARS = 1024
MAX_CREATED_US = 253_402_214_400_000_000  # 9999-12-31 00:00 UTC. Past year 9999 neither
# Python's datetime nor the databases' timestamps hold a time, and the consumer's INSERT would
# fail on every try of its transaction; a day short of it, so that the float seconds a
# consumer computes (precise to ~30 µs out there) cannot round into year 10000
MAX_PARKED = 1024  # PUTs waiting for room; beyond that a PUT that does not fit is refused
DRAIN_PER_POLL = 256  # messages read per socket per wake-up before timers and dispatch run
_POSITION = 1 << 48  # a remembered (partition, offset) as one int: partition * _POSITION + offset


def partition_of(key: str, partitions: int) -> int:
    """The partition of a keyed record: ``crc32(key) % partitions``, the one place it is
    computed. Every string here came through ``proto.parse_json``, which refuses lone
    surrogates, so ``encode`` cannot fail."""
    return zlib.crc32(key.encode()) % partitions


class _Columns(NamedTuple):
    """A PUT part's header columns, each a list with one value per record (values not yet
    checked: checks and ring appends work on whole columns)."""

    ids: list[Any]
    keys: list[Any]
    created_us: list[Any]
    sizes: list[Any]

    @classmethod
    def of(cls, header: dict[str, Any]) -> _Columns:
        ids = proto.require(header, "ids", list)
        count = len(ids)
        return cls(ids, proto.column(header, "keys", count, optional=True),
                   proto.column(header, "created_us", count), proto.column(header, "sizes", count))


@dataclass
class ConsumerState:
    name: str
    registered_at: float
    last_seen: float
    credit: int = 0
    assigned: list[int] = field(default_factory=list)
    delivered: int = 0
    acked: int = 0
    next_partition: int = 0  # round-robin start among its partitions when dispatching


@dataclass
class ProducerState:
    name: str
    last_seen: float
    records: int = 0


Part = tuple[dict[str, Any] | ProtocolError, bytes]
"""A PUT part: its parsed header (or why it could not be parsed) and its payload frame."""


Need = tuple[int, dict[int, int]]  # keyless records, keyed records per partition


@dataclass(slots=True)
class ParkedPut:
    """A PUT waiting for room, its reply held back: the REQ producer simply waits for it."""

    route: list[bytes]  # the producer's identity, and its request tag if it pipelines
    parts: list[Part]
    deadline: float
    need: Need  # the room it waits for, counted once when it was parked


class Broker(Node):
    """The broker node; ``start()`` runs it on a thread, ``run()`` in the caller's."""

    kind = "broker"

    def __init__(self, config: BrokerConfig | None = None, *,
                 context: zmq.Context[Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(context)
        self.config = config or BrokerConfig()
        self.clock = clock
        self.partitions = [Partition(i, self.config.capacity)
                           for i in range(self.config.partitions)]
        self.consumers: dict[str, ConsumerState] = {}
        self.producers: dict[bytes, ProducerState] = {}
        self._producer_names: set[str] = set()
        self._consumer_names: set[str] = set()
        self._held: set[str] = set()  # ids in the queue (a set: memory, see Partition)
        # Acknowledged ids -> position, for idempotent retries: the newest generation, and the
        # one before it (the last dedupe_window to 2 x dedupe_window acknowledged ids).
        self._recent: dict[str, int] = {}
        self._recent_old: dict[str, int] = {}
        self._round_robin = 0
        self._parked: deque[ParkedPut] = deque()
        self.outbox: list[tuple[str, list[bytes]]] = []
        self.started_at = clock()
        self._next_heartbeat = 0.0
        self.stopping_until: float | None = None  # set by stop(): drain, then exit
        self.counters = {"put": 0, "duplicates": 0, "refused": 0, "delivered": 0, "acked": 0,
                         "released": 0, "expired": 0, "dead": 0, "waited": 0}

    # -- loop --------------------------------------------------------------------------------
    def serve(self, control: zmq.Socket[Any]) -> None:
        frontend = new_socket(self.context, zmq.ROUTER)
        # A restarted consumer reuses its identity: without HANDOVER the old pipe keeps it and
        # the new one receives nothing. MANDATORY turns a send to a vanished consumer into an
        # error we act on, instead of a silent drop.
        backend = new_socket(self.context, zmq.ROUTER, router_handover=1, router_mandatory=1)
        try:
            bind(frontend, self.config.frontend, "broker frontend")
            bind(backend, self.config.backend, "broker backend")
            self.log.info("broker listening frontend=%s backend=%s partitions=%d capacity=%d",
                          self.config.frontend, self.config.backend, self.config.partitions,
                          self.config.capacity)
            if self.config.put_wait_ms >= REPLY_TIMEOUT_MS:
                self.log.warning(
                    "put-wait-ms=%d is not under the producers' default reply timeout (%d ms): "
                    "a producer may give up on a parked PUT and send it again (stored once, "
                    "but sent twice)", self.config.put_wait_ms, REPLY_TIMEOUT_MS)
            self.bound()
            self._loop(control, frontend, backend)
        finally:
            frontend.close(500)  # let the last replies (UNAVAILABLE to parked PUTs) go out
            backend.close(0)

    def _loop(self, control: zmq.Socket[Any], frontend: zmq.Socket[Any],
              backend: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        for sock in (control, frontend, backend):
            poller.register(sock, zmq.POLLIN)
        tick_s = self.config.tick_ms / 1000
        next_tick = self.clock()
        while True:
            wake = min(next_tick, self._parked[0].deadline) if self._parked else next_tick
            timeout_ms = max(0, int((wake - self.clock()) * 1000))
            events = dict(poller.poll(timeout_ms))
            now = self.clock()
            if control in events:
                control.recv()
                self.stopping_until = now + self.config.drain_timeout_s
                self.log.info("broker stopping: refusing new records, draining for up to %.0f s",
                              self.config.drain_timeout_s)
                self.unpark(now)  # parked PUTs learn at once that the broker is going away
            if self.stopping_until is not None and self._drained(now):
                self._flush(frontend, backend, now)
                return
            if frontend in events:
                self._drain(frontend, self.handle_frontend, now)
            if backend in events:
                self._drain(backend, self.handle_backend, now)
            if now >= next_tick:
                self.tick(now)
                next_tick = now + tick_s
            if self._parked:
                self.unpark(now)
            self.dispatch(now)
            self._flush(frontend, backend, now)

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handle: Callable[[list[bytes], float], None],
               now: float) -> None:
        for _ in range(DRAIN_PER_POLL):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            handle(frames, now)

    def _flush(self, frontend: zmq.Socket[Any], backend: zmq.Socket[Any], now: float) -> None:
        while self.outbox:
            outbox, self.outbox = self.outbox, []
            for side, frames in outbox:
                sock = frontend if side == FRONT else backend
                try:
                    send_frames(sock, frames)
                except zmq.ZMQError as exc:
                    if side == FRONT:
                        self.log.warning("reply to a producer that is gone dropped: %s", exc)
                    else:  # EHOSTUNREACH thanks to ROUTER_MANDATORY: the consumer is gone
                        name = frames[0].decode(errors="replace")
                        if name in self.consumers:
                            self.counters["expired"] += 1
                            self._remove_consumer(name, f"unreachable ({exc})", now)
                            self.dispatch(now)

    def _send(self, side: str, identity: bytes, frames: list[bytes]) -> None:
        self.outbox.append((side, proto.envelope((identity,), frames)))

    # -- frontend: producers and status clients ------------------------------------------------
    def handle_frontend(self, frames: list[bytes], now: float) -> None:
        """Handle one message from a REQ client; every request gets exactly one reply."""
        try:
            route, body = proto.split_envelope(frames)
        except ProtocolError as exc:
            self.log.warning("frontend: dropped malformed envelope: %s", exc.reason)
            return
        self._answer(route, self._request, route, body, now)

    def _answer(self, route: list[bytes], handle: Callable[..., list[bytes] | None],
                *args: Any) -> None:
        """Send ``handle(*args)``'s reply (None: a parked PUT, answered later), or its ERR."""
        try:
            reply = handle(*args)
        except ReplyError as exc:
            reply = proto.encode_err(exc.code, exc.reason)
        except Exception as exc:  # keep serving; the client learns something went wrong
            self.log.exception("frontend: internal error")
            reply = proto.encode_err(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if reply is not None:
            self.outbox.append((FRONT, proto.envelope(route, reply)))

    def _request(self, route: list[bytes], body: list[bytes], now: float) -> list[bytes] | None:
        message = proto.decode(body)
        if message.command is Command.PUT:
            return self._put(route, message, now)  # the route: a parked PUT is answered later
        handler = {
            Command.HELLO: self._hello_producer,
            Command.HEARTBEAT: self._heartbeat_producer,
            Command.BYE: self._bye_producer,
            Command.STATS: self._stats,
        }.get(message.command)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                f"{message.command.name} is not a producer command")
        return handler(route[0], message, now)

    def _hello_producer(self, identity: bytes, message: proto.Message, now: float) -> list[bytes]:
        name = proto.require(message.header, "name", str)
        role = message.header.get("role", "producer")
        if role != "producer" or not name:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                "the frontend registers producers: HELLO needs role 'producer' "
                                "and a non-empty name")
        if identity not in self.producers:
            self.log.info("producer registered name=%s", name)
        self.producers[identity] = ProducerState(name=name, last_seen=now)
        self._producer_names.add(name)
        return proto.encode(Command.WELCOME, self._welcome())

    def _welcome(self) -> dict[str, Any]:
        return {"partitions": self.config.partitions, "heartbeat_ms": self.config.heartbeat_ms,
                "liveness": self.config.liveness, "ready": self._not_ready() is None}

    def _registered_producer(self, identity: bytes, now: float) -> ProducerState:
        state = self.producers.get(identity)
        if state is None:
            raise Refused(ErrorCode.NOT_REGISTERED, "say HELLO before sending records")
        state.last_seen = now
        return state

    def _heartbeat_producer(self, identity: bytes, message: proto.Message,
                            now: float) -> list[bytes]:
        self._registered_producer(identity, now)
        return proto.encode(Command.HEARTBEAT)

    def _bye_producer(self, identity: bytes, message: proto.Message, now: float) -> list[bytes]:
        state = self.producers.pop(identity, None)
        if state is not None:
            self.log.info("producer left name=%s", state.name)
        return proto.encode(Command.BYE)

    def _not_ready(self) -> str | None:
        missing_p = self.config.expect_producers - len(self._producer_names)
        missing_c = self.config.expect_consumers - len(self._consumer_names)
        if missing_p <= 0 and missing_c <= 0:
            return None
        return (f"waiting for {max(missing_p, 0)} more producer(s) and {max(missing_c, 0)} more "
                "consumer(s) to register")

    def _drained(self, now: float) -> bool:
        """While stopping: done once consumers stored everything, none is left, or time is up."""
        held = sum(p.depth for p in self.partitions)
        if held and self.consumers and now < (self.stopping_until or now):
            return False
        if held:
            self.log.warning("broker stopped holding %d record(s) that no consumer stored: they "
                             "are lost (the broker keeps records in memory)", held)
        self.log.info("broker stopped")
        return True

    def _put(self, route: list[bytes], message: proto.Message, now: float) -> list[bytes] | None:
        """Store a PUT now, or park it (no reply yet) while the records it brings do not fit.

        Waiting for room instead of refusing at once is the broker's backpressure: a producer
        whose records would be refused PARTITION_FULL waits up to ``put_wait_ms`` for
        consumers to acknowledge, spending no CPU, instead of resending refused records in a
        loop and taking the CPU the consumers need to make that room.
        """
        identity = route[0]
        self._registered_producer(identity, now)
        self._check_open()
        parts: list[Part] = []
        for header, blob in proto.put_parts(message):
            try:
                parts.append((proto.parse_header(header), blob))
            except ProtocolError as exc:
                parts.append((exc, blob))
        need = self._must_wait(parts) if len(self._parked) < MAX_PARKED else None
        if need is not None:
            self._parked.append(ParkedPut(route, parts, now + self.config.put_wait_ms / 1000,
                                          need))
            self.counters["waited"] += 1
            return None
        return self._store_parts(identity, parts, now)

    def _check_open(self) -> None:
        if self.stopping_until is not None:
            raise Refused(ErrorCode.UNAVAILABLE, "the broker is shutting down")
        waiting = self._not_ready()
        if waiting is not None:
            raise Refused(ErrorCode.NOT_READY, waiting)

    def unpark(self, now: float) -> None:
        """Answer parked PUTs that fit now or whose wait is over, oldest first.

        Any PUT that fits goes, not only the oldest: a PUT waiting for one full keyed
        partition must not hold up others bound for partitions with room. A big PUT can be
        overtaken by small ones, for ``put_wait_ms`` at most. The room a PUT needs was
        counted when it was parked, so a wake-up only compares numbers: this runs after every
        consumer ACK while the queue is full, and counting again (set differences over every
        id) had been an eighth of the broker's CPU in the benchmark.
        """
        waiting: deque[ParkedPut] = deque()
        may_wait = bool(self.consumers) and self.stopping_until is None
        while self._parked:
            parked = self._parked.popleft()
            if may_wait and now < parked.deadline and not self._room_for(parked.need):
                waiting.append(parked)
            else:
                self._answer(parked.route, self._store_parts, parked.route[0], parked.parts,
                             now)
        self._parked = waiting

    def _must_wait(self, parts: list[Part]) -> Need | None:
        """The room these records wait for, while some would be refused for lack of room
        that consumers can still make; None when they need not wait (they fit, or a part is
        too big for the empty partitions and goes through at once).

        It reads headers nobody checked yet, so anything odd in them counts as "no need to
        wait": storing the PUT then refuses what is wrong, with the reason."""
        if not self.config.put_wait_ms or not self.consumers:
            return None
        need = self._need(parts, count_known=True)
        if need is None or self._room_for(need):
            return None
        need = self._need(parts, count_known=False)  # retries of known ids need no room
        if need is None or self._room_for(need):
            return None
        return need

    def _room_for(self, need: Need) -> bool:
        keyless, keyed = need
        rooms = [p.room for p in self.partitions]
        if any(n > rooms[number] for number, n in keyed.items()):
            return False
        return keyless <= sum(rooms) - sum(keyed.values())

    def _need(self, parts: list[Part], *, count_known: bool) -> Need | None:
        """(keyless records, keyed records per partition) of these parts; None if they could
        never fit whole (then what fits is stored and the rest refused at once)."""
        count = len(self.partitions)
        keyless = 0
        keyed: dict[int, int] = {}  # partition -> keyed records for it (not a Counter: its
        # Python-level __init__ showed in the broker's profile, once per PUT)
        for header, _ in parts:
            if isinstance(header, ProtocolError):
                continue
            ids, keys = header.get("ids"), header.get("keys")
            if not isinstance(ids, list):
                continue
            if not isinstance(keys, str | list) or (isinstance(keys, list)
                                                    and len(keys) != len(ids)):
                keys = None
            fresh = None if count_known else self._unknown(ids)
            if not isinstance(keys, list):  # the usual case: no loop
                number_of_records = len(ids) if fresh is None else len(fresh)
                if keys is None:
                    keyless += number_of_records
                else:
                    number = partition_of(keys, count)
                    keyed[number] = keyed.get(number, 0) + number_of_records
                continue
            for record_id, key in zip(ids, keys, strict=True):
                if fresh is not None:
                    if record_id not in fresh:
                        continue
                    fresh.discard(record_id)  # a second copy in the part needs no room
                if isinstance(key, str):
                    number = partition_of(key, count)
                    keyed[number] = keyed.get(number, 0) + 1
                else:
                    keyless += 1
        capacity = self.config.capacity
        if (keyless + sum(keyed.values()) > capacity * count
                or max(keyed.values(), default=0) > capacity):
            return None
        return keyless, keyed

    def _unknown(self, ids: list[Any]) -> set[Any] | None:
        """The distinct ids of a part that the broker neither holds nor recently acked (the
        ones that need room; a second copy in the same part is a duplicate of the first), or
        None when an id cannot be looked up at all (storing the part refuses it).

        Three set differences in C, not a Python test per record: parked PUTs are checked
        again on every wake-up of the broker while the queue is full. One set at a time,
        because ``difference`` with several arguments walks every other set whole."""
        try:
            fresh = set(ids)
        except TypeError:
            return None
        for known in (self._held, self._recent, self._recent_old):
            fresh = fresh.difference(known)
        return fresh

    def _store_parts(self, identity: bytes, parts: list[Part], now: float) -> list[bytes]:
        """Store every part of a PUT; answer with one ACK body per part, in order."""
        producer = self._registered_producer(identity, now)
        self._check_open()
        bodies: list[bytes] = []
        for header, blob in parts:
            try:
                if isinstance(header, ProtocolError):
                    raise header
                body = self._put_part(header, blob, producer)
            except ReplyError as exc:  # this part as a whole: the others still count
                if len(parts) == 1:
                    raise
                body = {"code": exc.code, "reason": exc.reason, "retryable": False}
            bodies.append(proto.dump(body))
        return proto.encode_parts(Command.ACK, bodies)

    def _put_part(self, header: dict[str, Any], blob: bytes,
                  producer: ProducerState) -> dict[str, Any]:
        """Store one part's records: ``{"acks": runs, "dups": [...], "errors": [...]}``.

        Each record is checked on its own; the accepted ones are stored in runs (a keyless
        run goes to one partition, the next run to the next: Kafka's sticky partitioner,
        which keeps batches whole on every later hop), and acknowledged as runs
        ``[index, count, partition, first offset]``.
        """
        columns = _Columns.of(header)
        payloads = proto.split_payloads(columns.sizes, [blob])
        not_json = proto.invalid_objects(payloads)
        errors: list[list[Any]] = []
        dups: list[list[Any]] = []
        repeats: list[int] = []
        if not not_json and self._all_fresh_and_valid(columns):
            accepted = list(range(len(columns.ids)))
        else:
            accepted = self._check_each(columns, not_json, errors, dups)
            ids = columns.ids
            if len({ids[i] for i in accepted}) != len(accepted):  # an id twice in a batch
                first_of: set[str] = set()
                unique: list[int] = []
                for i in accepted:
                    (repeats if ids[i] in first_of else unique).append(i)
                    first_of.add(ids[i])
                accepted = unique
        acks = self._place(accepted, columns, payloads, producer.name, errors)
        for index in repeats:
            known = self._locate(columns.ids[index], columns.keys[index])
            if known is not None:
                dups.append([index, *known])
            else:  # its first copy was refused: so is this one
                errors.append([index, ErrorCode.PARTITION_FULL.value,
                               "the first copy of this id in the batch was refused", True])
        stored = sum(run[1] for run in acks)
        self.counters["duplicates"] += len(dups)
        producer.records += stored
        self.counters["put"] += stored
        if errors:
            errors.sort()
            self.counters["refused"] += len(errors)
            codes = Counter(e[1] for e in errors)
            self.log.info("refused records producer=%s count=%d codes=%s first=%s",
                          producer.name, len(errors), dict(codes), errors[0][2])
        return {"acks": acks, "dups": dups, "errors": errors}

    def _all_fresh_and_valid(self, columns: _Columns) -> bool:
        """The common case, checked a column at a time in C: every id a new, unique string of
        the allowed length, every key null or a short string, every time an int from 1970 to
        9999, every payload within the size limit. When this is False, ``_check_each`` finds
        out which record."""
        ids, keys, created, sizes = columns.ids, columns.keys, columns.created_us, columns.sizes
        if not ids:
            return True
        if set(map(type, ids)) != {str} or set(map(type, created)) != {int}:
            return False
        if not (0 <= min(created) and max(created) <= MAX_CREATED_US):
            return False
        if not (0 < min(map(len, ids)) and max(map(len, ids)) <= MAX_ID_CHARS):
            return False
        if max(sizes) > self.config.max_payload_bytes or len(set(ids)) != len(ids):
            return False
        if keys.count(None) != len(keys):
            named = [k for k in keys if k is not None]
            if set(map(type, named)) != {str} or max(map(len, named)) > MAX_KEY_CHARS:
                return False
        return (self._held.isdisjoint(ids) and self._recent.keys().isdisjoint(ids)
                and self._recent_old.keys().isdisjoint(ids))

    def _check_each(self, columns: _Columns, not_json: set[int], errors: list[list[Any]],
                    dups: list[list[Any]]) -> list[int]:
        """Check records one by one: the accepted indices; refusals and retries recorded."""
        accepted: list[int] = []
        held, recent, older = self._held, self._recent, self._recent_old
        max_bytes = self.config.max_payload_bytes
        for index, (record_id, key, created_us, size) in enumerate(zip(*columns, strict=True)):
            if type(record_id) is not str or not 0 < len(record_id) <= MAX_ID_CHARS:
                errors.append([index, ErrorCode.INVALID_RECORD.value,
                               f"id must be a string of 1 to {MAX_ID_CHARS} characters", False])
            elif key is not None and (type(key) is not str or len(key) > MAX_KEY_CHARS):
                errors.append([index, ErrorCode.INVALID_RECORD.value,
                               f"key must be null or a string of at most {MAX_KEY_CHARS} chars",
                               False])
            elif type(created_us) is not int or not 0 <= created_us <= MAX_CREATED_US:
                errors.append([index, ErrorCode.INVALID_RECORD.value,
                               "created_us must be an integer of microseconds of Unix time, "
                               "from 1970 up to the last day of year 9999", False])
            elif ((record_id in held or record_id in recent or record_id in older)
                  and (known := self._locate(record_id, key)) is not None):
                dups.append([index, *known])  # an idempotent retry: the original position
            elif size > max_bytes:
                errors.append([index, ErrorCode.TOO_LARGE.value,
                               f"payload of {size} bytes exceeds {max_bytes}", False])
            elif index in not_json:
                errors.append([index, ErrorCode.INVALID_RECORD.value,
                               "payload must be one JSON object (UTF-8, no NaN or Infinity, "
                               "no lone surrogate)", False])
            else:
                accepted.append(index)
        return accepted

    def _place(self, accepted: list[int], columns: _Columns, payloads: list[bytes],
               producer: str, errors: list[list[Any]]) -> list[list[int]]:
        """Append accepted records to their partitions; ACK runs, PARTITION_FULL for the rest."""
        partitions = self.partitions
        count = len(partitions)
        keys = columns.keys
        keyed: dict[int, list[int]] = {}
        keyless: list[int]
        if keys.count(None) == len(keys):
            keyless = accepted
        else:
            keyless = []
            for i in accepted:
                key = keys[i]
                if key is None:
                    keyless.append(i)
                else:
                    keyed.setdefault(partition_of(key, count), []).append(i)
        runs: list[list[int]] = []
        for number, indices in keyed.items():
            left = self._store_run(partitions[number], indices, columns, payloads, producer, runs)
            for i in left:
                errors.append([i, ErrorCode.PARTITION_FULL.value, f"partition {number} is full "
                               f"({self.config.capacity} records); retry later", True])
        if keyless:
            start = self._round_robin
            self._round_robin = (start + 1) % count
            for step in range(count):
                keyless = self._store_run(partitions[(start + step) % count], keyless, columns,
                                          payloads, producer, runs)
                if not keyless:
                    break
            for i in keyless:
                errors.append([i, ErrorCode.PARTITION_FULL.value, "every partition is full "
                               f"({self.config.capacity} records each); retry later", True])
        runs.sort()
        return runs

    def _store_run(self, partition: Partition, indices: list[int], columns: _Columns,
                   payloads: list[bytes], producer: str, runs: list[list[int]]) -> list[int]:
        """Append what fits of ``indices`` to one partition; return the indices left over."""
        room = partition.room
        if room <= 0:
            return indices
        lo = indices[0]
        if indices[-1] - lo == len(indices) - 1:  # consecutive (the usual case): slices
            hi = lo + min(len(indices), room)
            ids, keys = columns.ids[lo:hi], columns.keys[lo:hi]
            created, chosen = columns.created_us[lo:hi], payloads[lo:hi]
        else:
            ids = [columns.ids[i] for i in indices]
            keys = [columns.keys[i] for i in indices]
            created = [columns.created_us[i] for i in indices]
            chosen = [payloads[i] for i in indices]
        first, stored = partition.extend(ids, keys, producer, created, chosen)
        self._held.update(ids[:stored])
        number = partition.number
        if stored and indices[stored - 1] - indices[0] == stored - 1:  # consecutive: one run
            runs.append([indices[0], stored, number, first])
        else:
            for k in range(stored):
                i = indices[k]
                if runs and runs[-1][2] == number and runs[-1][0] + runs[-1][1] == i \
                        and runs[-1][3] + runs[-1][1] == first + k:
                    runs[-1][1] += 1
                else:
                    runs.append([i, 1, number, first + k])
        return indices[stored:]

    def _locate(self, record_id: str, key: str | None) -> tuple[int, int] | None:
        """Where a known id sits: held (found by a scan, only on retries) or recently acked."""
        if record_id in self._held:
            count = len(self.partitions)
            first = partition_of(key, count) if key is not None else 0
            for number in [first, *range(count)]:
                offset = self.partitions[number].find(record_id)
                if offset is not None:
                    return number, offset
        position = self._recent.get(record_id, self._recent_old.get(record_id))
        if position is None:
            return None
        number, offset = divmod(position, _POSITION)
        return number, offset

    def _stats(self, identity: bytes, message: proto.Message, now: float) -> list[bytes]:
        return proto.encode(Command.STATS, self.snapshot(now))

    # -- backend: consumers ----------------------------------------------------------------------
    def handle_backend(self, frames: list[bytes], now: float) -> None:
        try:
            route, body = proto.split_envelope(frames)
            identity = route[0]  # a consumer's DEALER sends no request tags
        except ProtocolError as exc:
            self.log.warning("backend: dropped malformed envelope: %s", exc.reason)
            return
        try:
            name = identity.decode()
        except UnicodeDecodeError:
            self._send(BACK, identity, proto.encode_err(ErrorCode.BAD_MESSAGE,
                                                        "consumer identity must be UTF-8 text"))
            return
        try:
            message = proto.decode(body)
            if message.command is Command.HELLO:
                self._hello_consumer(name, message, now)
                return
            state = self.consumers.get(name)
            if state is None:
                raise Refused(ErrorCode.NOT_REGISTERED, "say HELLO before anything else")
            state.last_seen = now
            if message.command is Command.FETCH:
                credit = proto.require(message.header, "credit", int)
                if credit < 0:
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "credit must be >= 0")
                state.credit = credit
            elif message.command is Command.ACK:
                self._ack(state, message)
            elif message.command is Command.HEARTBEAT:
                pass
            elif message.command is Command.BYE:
                self._remove_consumer(name, "said BYE", now)
            else:
                raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                    f"{message.command.name} is not a consumer command")
        except ReplyError as exc:
            self._send(BACK, identity, proto.encode_err(exc.code, exc.reason))
        except Exception as exc:
            self.log.exception("backend: internal error")
            self._send(BACK, identity, proto.encode_err(ErrorCode.INTERNAL,
                                                        f"{type(exc).__name__}: {exc}"))

    def _hello_consumer(self, name: str, message: proto.Message, now: float) -> None:
        if message.header.get("role", "consumer") != "consumer":
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the backend registers consumers only")
        if name in self.consumers:  # it restarted or lost us: what it held is released first
            self._remove_consumer(name, "registered again", now, rebalance=False)
        self.consumers[name] = ConsumerState(name=name, registered_at=now, last_seen=now)
        self._consumer_names.add(name)
        self.log.info("consumer registered name=%s", name)
        self._send(BACK, name.encode(), proto.encode(Command.WELCOME, self._welcome()))
        self._rebalance()

    def _ack(self, state: ConsumerState, message: proto.Message) -> None:
        """Apply each partition's ACK on its own: a refused one changes nothing and is
        answered with ERR, the others still count."""
        entries = proto.require(message.header, "acks", list)
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "each ACK entry must be an object")
                self._ack_partition(state, entry)
            except ReplyError as exc:
                number = entry.get("partition") if isinstance(entry, dict) else None
                self._send(BACK, state.name.encode(),
                           proto.encode_err(exc.code, exc.reason, partition=number))

    def _ack_partition(self, state: ConsumerState, entry: dict[str, Any]) -> None:
        number = proto.require(entry, "partition", int)
        epoch = proto.require(entry, "epoch", int)
        runs = proto.require(entry, "offsets", list)
        if not 0 <= number < len(self.partitions):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"no partition {number}")
        offsets = proto.from_runs(runs)
        dead = entry.get("dead") or []
        if dead and (not isinstance(dead, list) or not set(dead) <= set(offsets)):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "dead must list some of the offsets")
        first, removed = self.partitions[number].ack(state.name, epoch, offsets)
        state.acked += len(offsets)
        self.counters["acked"] += len(offsets)
        self.counters["dead"] += len(dead)
        self._held.difference_update(removed)
        window = self.config.dedupe_window
        if window and removed:
            base = number * _POSITION + first
            positions = zip(removed, range(base, base + len(removed)), strict=True)
            if dead:  # a dead letter was not stored: replaying its id must not look like a retry
                buried = {number * _POSITION + o for o in dead}
                self._recent.update((i, p) for i, p in positions if p not in buried)
            else:
                self._recent.update(positions)
            if len(self._recent) >= window:  # two generations: a bounded dict with no per-id
                self._recent_old, self._recent = self._recent, {}  # eviction work

    def _remove_consumer(self, name: str, why: str, now: float, *, rebalance: bool = True) -> None:
        state = self.consumers.pop(name, None)
        if state is None:
            return
        self.log.info("consumer left name=%s reason=%s", name, why)
        targets = round_robin(len(self.partitions), list(self.consumers)) if self.consumers else {}
        for partition in self.partitions:
            if partition.owner == name or partition.target == name:
                partition.want_owner(targets.get(partition.number))
                if partition.owner == name:
                    released = partition.owner_gone()
                    self.counters["released"] += released
                    if released:
                        self.log.info("released records partition=%d count=%d",
                                      partition.number, released)
        if rebalance:
            self._rebalance()

    def _rebalance(self) -> None:
        targets = (round_robin(len(self.partitions), list(self.consumers))
                   if self.consumers else {})
        for partition in self.partitions:
            partition.want_owner(targets.get(partition.number))
        for name, state in self.consumers.items():
            assigned = sorted(p for p, c in targets.items() if c == name)
            if assigned != state.assigned:
                state.assigned = assigned
                self.log.info("assignment consumer=%s partitions=%s", name,
                              [p + 1 for p in assigned])
                self._send(BACK, name.encode(),
                           proto.encode(Command.ASSIGN, {"partitions": assigned}))

    # -- delivery ----------------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        """Hand pending records to owners that have credit.

        One RECORDS message per consumer carries a batch from each of its ready partitions
        (up to ``max_batch`` records in all), so the message count does not grow with the
        number of partitions a consumer owns. A consumer with nothing in flight gets what is
        pending at once; one that is still storing gets only full batches (Nagle's rule): it
        cannot use records sooner than its transaction ends, and a few large messages cost
        both sides far less than many small ones (with 6 consumers sharing a partition's
        flow, a sixth of the consumer CPU). What is left goes when its in-flight records
        are acknowledged, so the wait is bounded by one transaction.
        """
        max_batch = self.config.max_batch
        for state in self.consumers.values():
            owned = [p for p in self.partitions if p.owner == state.name]
            if not owned:
                continue
            inflight = sum(p.inflight for p in owned)
            available = state.credit - inflight
            ready = [p for p in owned if not p.draining and p.pending]
            if available <= 0 or not ready:
                continue
            start = state.next_partition % len(ready)
            state.next_partition += 1
            order = ready[start:] + ready[:start]
            while available > 0:
                budget = min(available, max_batch)
                if inflight and sum(p.pending for p in order) < budget:
                    break
                batches: list[tuple[Partition, Taken]] = []
                for partition in order:
                    taken = partition.take(budget)
                    if taken.ids:
                        batches.append((partition, taken))
                        budget -= len(taken.ids)
                        if budget <= 0:
                            break
                if not batches:
                    break
                sent = sum(len(taken.ids) for _, taken in batches)
                available -= sent
                inflight += sent
                self._send_records(state, batches)

    def _send_records(self, state: ConsumerState, batches: list[tuple[Partition, Taken]]) -> None:
        header_batches = []
        payloads: list[bytes] = []
        for partition, taken in batches:
            compact = proto.compact
            header_batches.append({
                "partition": partition.number, "epoch": partition.epoch,
                "offsets": taken.offsets, "ids": taken.ids, "keys": compact(taken.keys),
                "producers": compact(taken.producers), "created_us": compact(taken.created_us),
                "attempts": compact(taken.attempts),
                "sizes": compact(list(map(len, taken.payloads))),
            })
            payloads.extend(taken.payloads)
        state.delivered += len(payloads)
        self.counters["delivered"] += len(payloads)
        self._send(BACK, state.name.encode(), proto.encode(
            Command.RECORDS, {"batches": header_batches}, proto.join_payloads(payloads)))

    # -- timers ------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Expire silent consumers and producers; send heartbeats."""
        expiry = self.config.expiry_s
        for name, state in list(self.consumers.items()):
            if now - state.last_seen > expiry:
                self.counters["expired"] += 1
                silent = now - state.last_seen
                self._remove_consumer(name, f"expired: silent for {silent:.1f} s", now)
        waiting = {parked.route[0] for parked in self._parked}  # a REQ producer cannot send
        for identity, producer in list(self.producers.items()):  # heartbeats while it waits
            if now - producer.last_seen > expiry and identity not in waiting:
                del self.producers[identity]  # it says HELLO again when it comes back
                self.log.info("producer expired name=%s", producer.name)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_ms / 1000
            for name in self.consumers:
                self._send(BACK, name.encode(), proto.encode(Command.HEARTBEAT))

    # -- status ------------------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Status of every partition, consumer and producer; called on the broker thread."""
        now = self.clock() if now is None else now
        partitions = [p.snapshot() for p in self.partitions]
        consumers = []
        for name in sorted(self.consumers, key=consumer_order):
            state = self.consumers[name]
            consumers.append({
                "name": name, "partitions": state.assigned, "credit": state.credit,
                "inflight": sum(p["inflight"] for p in partitions if p["owner"] == name),
                "delivered": state.delivered, "acked": state.acked,
                "last_seen_s": round(now - state.last_seen, 3),
            })
        producers = [{"name": p.name, "records": p.records,
                      "last_seen_s": round(now - p.last_seen, 3)}
                     for p in sorted(self.producers.values(), key=lambda p: p.name)]
        return {
            "uptime_s": round(now - self.started_at, 3),
            "ready": self._not_ready() is None,
            "waiting": self._not_ready(),
            "partitions": partitions, "consumers": consumers, "producers": producers,
            "counters": dict(self.counters),
            "waiting_puts": len(self._parked),
            "held_ids": len(self._held),
        }
