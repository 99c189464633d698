"""The queue service: partitioned ring buffers between a producer ROUTER and a consumer ROUTER.

One thread, one poller, one dispatch table per socket, timers after the poll (the Majordomo
broker's shape). Handlers never touch sockets: they return their reply or append messages to
an outbox that the loop flushes, so tests drive ``handle_frontend``/``handle_backend``/
``tick`` with fake time and frames and read the outbox.

A record enters a partition on PUT (and only then is the producer acknowledged), is handed to
the partition's owner when that consumer has credit, and leaves the partition only on the
owner's ACK for the current epoch, in the consumer's current session. Beside the broker:
``Intake`` checks and places a PUT's records, ``DedupeWindow`` knows the ids held and
recently acknowledged, ``Parking`` holds PUTs that wait for room, ``Partition`` is one ring
and its lease, ``ConsumerSession`` one consumer's registration with its sequence numbers.
The broker never blocks on a peer: every send is non-blocking, and a peer that does not read
is dropped.
"""

from __future__ import annotations

import time
from bisect import insort
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import zmq

from zmqlab import protocol as proto
from zmqlab.assignment import consumer_order, round_robin
from zmqlab.config import REPLY_TIMEOUT_MS, BrokerConfig
from zmqlab.dedupe import DedupeWindow
from zmqlab.errors import ConfigError, ErrorCode, ProtocolError, Refused, ReplyError
from zmqlab.intake import Intake
from zmqlab.node import NOBLOCK, Node, bind, new_socket, recv_frames, send_frames
from zmqlab.parking import ParkedPut, Parking, Part
from zmqlab.partition import Partition, Taken
from zmqlab.protocol import MAX_FRAME_BYTES, MAX_NAME_CHARS, Command, Message
from zmqlab.sessions import ConsumerSession
from zmqlab.wal import DiskFailure, Fsync, Log, restore

READ_PER_POLL = 256  # messages read per socket per wake-up before timers and delivery run

Handler = Callable[[list[bytes], Message, float], "list[bytes] | None"]
"""``handler(route, message, now)``: the reply frames, or None (answered later, or nothing;
a consumer's handlers send what they send through the consumer's session)."""


class Side(Enum):
    """Which socket a message goes out on."""

    FRONTEND = "frontend"  # producers and status clients
    BACKEND = "backend"  # consumers


@dataclass
class ProducerState:
    name: str
    last_seen: float
    records: int = 0


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
        self.dedupe = DedupeWindow(self.config.dedupe_window)
        self.wal: Log | None = None
        self.recovered = 0
        if self.config.data_dir is not None:
            self.wal = self._recover(self.config.data_dir)
        self.intake = Intake(self.partitions, self.dedupe, self.config.max_payload_bytes,
                             self.wal)
        self._next_sync = 0.0
        self.parking = Parking()
        self.consumers: dict[str, ConsumerSession] = {}
        self._order: list[str] = []  # consumer names in assignment order (see assignment.py)
        self._assigned: dict[str, list[int]] = {}  # the partitions each consumer was told
        self.producers: dict[bytes, ProducerState] = {}
        self._ready = False  # latched once the expected nodes registered
        self.outbox: list[tuple[Side, list[bytes]]] = []
        self.started_at = clock()
        self._next_heartbeat = 0.0
        self.stopping_until: float | None = None  # set by stop(): drain, then exit
        self.counters = {"put": 0, "duplicates": 0, "refused": 0, "delivered": 0, "acked": 0,
                         "released": 0, "expired": 0, "dead": 0, "waited": 0, "resets": 0,
                         "ack_timeouts": 0, "dropped": 0}
        self._frontend: dict[Command, Handler] = {
            Command.HELLO: self._hello_producer,
            Command.PUT: self._put,
            Command.HEARTBEAT: self._heartbeat_producer,
            Command.BYE: self._bye_producer,
            Command.STATS: self._stats,
        }
        self._backend: dict[Command, Handler] = {
            Command.HELLO: self._hello_consumer,
            Command.FETCH: self._fetch,
            Command.ACK: self._ack,
            Command.HEARTBEAT: self._heartbeat_consumer,
            Command.BYE: self._bye_consumer,
        }

    def _recover(self, directory: str) -> Log:
        """Open the log in ``directory`` and rebuild the partitions from it."""
        began = time.monotonic()
        wal = Log(directory, self.config.partitions, fsync=Fsync(self.config.fsync),
                  segment_bytes=self.config.segment_bytes)
        try:
            self.recovered = restore(wal, self.partitions)
            wal.open(self._positions())
        except (ValueError, OSError) as exc:
            wal.close()
            raise ConfigError(f"cannot recover the log in {directory}: {exc}") from None
        except BaseException:
            wal.close()
            raise
        for partition in self.partitions:
            self.dedupe.hold(partition.held_ids())
            partition.on_release = wal.release
        if self.recovered:
            self.log.info("recovered %d record(s) from %s in %.2f s", self.recovered, directory,
                          time.monotonic() - began)
        return wal

    def _positions(self) -> list[list[int]]:
        return [[p.head, p.tail] for p in self.partitions]

    def _sync(self, now: float) -> None:
        """Group commit: what this pass wrote is made durable before its ACKs go out."""
        wal = self.wal
        if wal is None or wal.fsync is Fsync.OFF:
            return
        if wal.fsync is Fsync.BATCH or now >= self._next_sync:
            self._next_sync = now + self.config.fsync_interval_ms / 1000
            try:
                wal.sync()
            except DiskFailure as exc:
                self.log.error("%s", exc)
                raise

    # -- loop --------------------------------------------------------------------------------
    def serve(self, control: zmq.Socket[Any]) -> None:
        # MANDATORY turns a send to a vanished peer (EHOSTUNREACH) or to one whose pipe is full
        # (EAGAIN, with NOBLOCK) into an error we act on, instead of a silent drop.
        frontend = new_socket(self.context, zmq.ROUTER, router_mandatory=1)
        # A restarted consumer reuses its identity: without HANDOVER the old pipe keeps it and
        # the new one receives nothing.
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
            if self.wal is not None:
                self.wal.close()

    def _loop(self, control: zmq.Socket[Any], frontend: zmq.Socket[Any],
              backend: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        for sock in (control, frontend, backend):
            poller.register(sock, zmq.POLLIN)
        sockets = {Side.FRONTEND: frontend, Side.BACKEND: backend}
        tick_s = self.config.tick_ms / 1000
        next_tick = self.clock()
        while True:
            deadline = self.parking.next_deadline
            wake = next_tick if deadline is None else min(next_tick, deadline)
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
                self._sync(now)
                self._flush(sockets, now)
                return
            if frontend in events:
                self._receive(frontend, self.handle_frontend, now)
            if backend in events:
                self._receive(backend, self.handle_backend, now)
            if now >= next_tick:
                self.tick(now)
                next_tick = now + tick_s
            if self.parking:
                self.unpark(now)
            self.deliver(now)
            self._sync(now)
            self._flush(sockets, now)

    @staticmethod
    def _receive(sock: zmq.Socket[Any], handle: Callable[[list[bytes], float], None],
                 now: float) -> None:
        """Handle what waits on ``sock``, a bounded number of messages per wake-up."""
        for _ in range(READ_PER_POLL):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            handle(frames, now)

    def _flush(self, sockets: dict[Side, zmq.Socket[Any]], now: float) -> None:
        """Send the outbox without ever waiting for a peer."""
        while self.outbox:
            outbox, self.outbox = self.outbox, []
            for side, frames in outbox:
                try:
                    send_frames(sockets[side], frames, NOBLOCK)
                except zmq.Again:  # its pipe is full: it does not read what we send
                    self._drop_peer(side, frames[0], "does not read (its pipe is full)", now)
                except zmq.ZMQError as exc:  # EHOSTUNREACH: it is gone
                    self._drop_peer(side, frames[0], f"unreachable ({exc})", now)

    def _drop_peer(self, side: Side, identity: bytes, why: str, now: float) -> None:
        self.counters["dropped"] += 1
        if side is Side.FRONTEND:
            producer = self.producers.pop(identity, None)
            if producer is not None:  # it says HELLO again if it comes back
                self.log.warning("producer dropped name=%s reason=%s", producer.name, why)
            return
        name = identity.decode(errors="replace")
        if name in self.consumers:
            self.counters["expired"] += 1
            self._remove_consumer(name, why, now)
            self.deliver(now)

    def _send(self, side: Side, identity: bytes, frames: list[bytes]) -> None:
        self.outbox.append((side, proto.envelope((identity,), frames)))

    # -- dispatch ----------------------------------------------------------------------------
    def handle_frontend(self, frames: list[bytes], now: float) -> None:
        """Handle one message from a producer or status client; each gets one reply."""
        self._handle(Side.FRONTEND, self._frontend, frames, now)

    def handle_backend(self, frames: list[bytes], now: float) -> None:
        """Handle one message from a consumer; errors are answered in its session."""
        try:
            route, body = proto.split_envelope(frames)
        except ProtocolError as exc:
            self.log.warning("backend: dropped malformed envelope: %s", exc.reason)
            return
        identity = route[0]  # a consumer's DEALER sends no request tags
        named: Any = None
        try:
            message = proto.decode(body)
            named = message.header.get("session")
            self._dispatch(self._backend, [identity], message, now)
        except Exception as exc:  # _refusal logs what is unexpected
            self._refuse_consumer(identity, named, self._refusal(Side.BACKEND, exc), now)

    def _handle(self, side: Side, table: dict[Command, Handler], frames: list[bytes],
                now: float) -> None:
        try:
            route, body = proto.split_envelope(frames)
        except ProtocolError as exc:
            self.log.warning("%s: dropped malformed envelope: %s", side.value, exc.reason)
            return
        try:
            reply = self._dispatch(table, route, proto.decode(body), now)
        except Exception as exc:  # _refusal logs what is unexpected
            error = self._refusal(side, exc)
            reply = proto.encode_err(error.code, error.reason)
        if reply is not None:
            self.outbox.append((side, proto.envelope(route, reply)))

    def _dispatch(self, table: dict[Command, Handler], route: list[bytes], message: Message,
                  now: float) -> list[bytes] | None:
        handler = table.get(message.command)
        if handler is None:
            role = "producer" if table is self._frontend else "consumer"
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                f"{message.command.name} is not a {role} command")
        return handler(route, message, now)

    def _refusal(self, side: Side, exc: Exception) -> ReplyError:
        """The one place an error becomes what is answered: a refusal as it is, anything
        unexpected as INTERNAL, with a log line; the loop carries on either way."""
        if isinstance(exc, ReplyError):
            return exc
        self.log.error("%s: internal error", side.value, exc_info=exc)
        return Refused(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _welcome(self, session: ConsumerSession | None = None) -> dict[str, Any]:
        welcome: dict[str, Any] = {
            "partitions": self.config.partitions, "heartbeat_ms": self.config.heartbeat_ms,
            "liveness": self.config.liveness, "ready": self._not_ready() is None}
        if session is not None:
            welcome.update(session=session.token, ack_timeout_ms=self.config.ack_timeout_ms)
        return welcome

    def _not_ready(self) -> str | None:
        """Why records are refused until the expected nodes registered, or None. Counts live
        registrations; once ready, the broker stays ready (a node that restarts later must
        not stop everyone else)."""
        if self._ready:
            return None
        expect_p, expect_c = self.config.expect_producers, self.config.expect_consumers
        missing_p = expect_p - len({p.name for p in self.producers.values()}) if expect_p else 0
        missing_c = expect_c - len(self.consumers)
        if missing_p <= 0 and missing_c <= 0:
            self._ready = True
            return None
        return (f"waiting for {max(missing_p, 0)} more producer(s) and {max(missing_c, 0)} more "
                "consumer(s) to register")

    @staticmethod
    def _check_name(name: str, what: str) -> None:
        """Names are stored with every record: bounded, and nothing a database refuses."""
        if not 0 < len(name) <= MAX_NAME_CHARS or "\x00" in name:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"a {what} name must be 1 to "
                                f"{MAX_NAME_CHARS} characters without NUL")

    def _check_open(self) -> None:
        if self.stopping_until is not None:
            raise Refused(ErrorCode.UNAVAILABLE, "the broker is shutting down")
        waiting = self._not_ready()
        if waiting is not None:
            raise Refused(ErrorCode.NOT_READY, waiting)

    def _drained(self, now: float) -> bool:
        """While stopping: done once consumers stored everything, none is left, or time is up."""
        held = sum(p.depth for p in self.partitions)
        if held and self.consumers and now < (self.stopping_until or now):
            return False
        if held and self.wal is None:
            self.log.warning("broker stopped holding %d record(s) that no consumer stored: they "
                             "are lost (the broker keeps records in memory)", held)
        elif held:
            self.log.info("broker stopped holding %d record(s) that no consumer stored yet: "
                          "they stay in its log and are delivered after a restart", held)
        self.log.info("broker stopped")
        return True

    # -- frontend: producers and status clients ------------------------------------------------
    def _hello_producer(self, route: list[bytes], message: Message, now: float) -> list[bytes]:
        name = proto.require(message.header, "name", str)
        role = message.header.get("role", "producer")
        if role != "producer" or not name:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                "the frontend registers producers: HELLO needs role 'producer' "
                                "and a non-empty name")
        self._check_name(name, "producer")
        if route[0] not in self.producers:
            self.log.info("producer registered name=%s", name)
        self.producers[route[0]] = ProducerState(name=name, last_seen=now)
        return proto.encode(Command.WELCOME, self._welcome())

    def _producer(self, route: list[bytes], now: float) -> ProducerState:
        state = self.producers.get(route[0])
        if state is None:
            raise Refused(ErrorCode.NOT_REGISTERED, "say HELLO before sending records")
        state.last_seen = now
        return state

    def _heartbeat_producer(self, route: list[bytes], message: Message,
                            now: float) -> list[bytes]:
        self._producer(route, now)
        return proto.encode(Command.HEARTBEAT)

    def _bye_producer(self, route: list[bytes], message: Message, now: float) -> list[bytes]:
        state = self.producers.pop(route[0], None)
        if state is not None:
            self.log.info("producer left name=%s", state.name)
        return proto.encode(Command.BYE)

    def _stats(self, route: list[bytes], message: Message, now: float) -> list[bytes]:
        return proto.encode(Command.STATS, self.snapshot(now))

    def _put(self, route: list[bytes], message: Message, now: float) -> list[bytes] | None:
        """Store a PUT now, or park it (no reply yet) while the records it brings do not fit
        and consumers can still make room, or while an older parked PUT holds records of the
        same keyed partitions (see ``zmqlab.parking``)."""
        self._producer(route, now)
        self._check_open()
        parts: list[Part] = []
        for header, blob in proto.put_parts(message):
            try:
                parts.append((proto.parse_header(header), blob))
            except ProtocolError as exc:
                parts.append((exc, blob))
        if self.config.put_wait_ms and self.consumers and not self.parking.full:
            headers = [h for h, _ in parts if isinstance(h, dict)]
            need = self.intake.need(headers)
            if need is None and self.parking:  # it fits, but may have to wait its turn
                turn = self.intake.count(headers)
                if turn is not None and turn[1] and self.parking.holds(turn[1]):
                    need = turn
            if need is not None:
                self.parking.park(ParkedPut(route, parts,
                                            now + self.config.put_wait_ms / 1000, need))
                self.counters["waited"] += 1
                return None
        return self._store_parts(route, parts, now)

    def unpark(self, now: float) -> None:
        """Answer parked PUTs that fit now or whose wait is over, oldest first."""
        def answer(put: ParkedPut) -> None:
            try:
                reply = self._store_parts(put.route, put.parts, now)
            except Exception as exc:  # _refusal logs what is unexpected
                error = self._refusal(Side.FRONTEND, exc)
                reply = proto.encode_err(error.code, error.reason)
            self.outbox.append((Side.FRONTEND, proto.envelope(put.route, reply)))

        may_wait = bool(self.consumers) and self.stopping_until is None
        self.parking.release(now, self.intake.room_for, answer, may_wait=may_wait)

    def _store_parts(self, route: list[bytes], parts: list[Part], now: float) -> list[bytes]:
        """Store every part of a PUT; answer with one ACK body per part, in order. A part
        that is wrong as a whole is refused on its own: the others still count."""
        producer = self._producer(route, now)
        self._check_open()
        bodies: list[bytes] = []
        for header, blob in parts:
            try:
                if isinstance(header, ProtocolError):
                    raise header
                result = self.intake.store(header, blob, producer.name)
            except ReplyError as exc:
                if len(parts) == 1:
                    raise
                bodies.append(proto.dump({"code": exc.code, "reason": exc.reason,
                                          "retryable": False}))
                continue
            self._count_part(producer, result.stored, result.duplicates, result.body["errors"])
            bodies.append(proto.dump(result.body))
        return proto.encode_parts(Command.ACK, bodies)

    def _count_part(self, producer: ProducerState, stored: int, duplicates: int,
                    errors: list[list[Any]]) -> None:
        producer.records += stored
        self.counters["put"] += stored
        self.counters["duplicates"] += duplicates
        if errors:
            self.counters["refused"] += len(errors)
            codes = Counter(e[1] for e in errors)
            self.log.info("refused records producer=%s count=%d codes=%s first=%s",
                          producer.name, len(errors), dict(codes), errors[0][2])

    # -- backend: consumers ----------------------------------------------------------------------
    @staticmethod
    def _name(identity: bytes) -> str:
        try:
            return identity.decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                "consumer identity must be UTF-8 text") from None

    def _send_consumer(self, state: ConsumerSession, command: Command, header: dict[str, Any],
                       now: float, payloads: list[bytes] | None = None) -> None:
        """Send in ``state``'s session: the message gets the session and its number."""
        self._send(Side.BACKEND, state.name.encode(),
                   proto.encode(command, state.stamp(header, now), payloads or ()))

    def _refuse_consumer(self, identity: bytes, named: Any, error: ReplyError,
                         now: float) -> None:
        """ERR to a consumer: in its session when the message was of it; otherwise naming
        the session the message named, unnumbered, so a live session is not disturbed."""
        header = proto.err_header(error.code, error.reason)
        state = self.consumers.get(identity.decode(errors="replace"))
        if state is not None and named == state.token:
            self._send_consumer(state, Command.ERR, header, now)
            return
        if isinstance(named, str) and len(named) <= 64:  # echoed, so bounded
            header["session"] = named
        self._send(Side.BACKEND, identity, proto.encode(Command.ERR, header))

    def _consumer(self, route: list[bytes], message: Message, now: float) -> ConsumerSession:
        """The session a consumer message belongs to; a message of no current session is
        refused and changes nothing, one that shows a lost message ends the session."""
        state = self.consumers.get(self._name(route[0]))
        if state is None or message.header.get("session") != state.token:
            raise Refused(ErrorCode.NOT_REGISTERED, "no such session: say HELLO")
        problem = state.receive(message.header)
        if problem is not None:
            self._end_session(state, problem, now)
            raise Refused(ErrorCode.NOT_REGISTERED, f"session reset: {problem}; say HELLO")
        state.last_seen = now
        return state

    def _end_session(self, state: ConsumerSession, why: str, now: float) -> None:
        """A message was lost: release what the session held (not the records' fault)."""
        self.counters["resets"] += 1
        self._remove_consumer(state.name, f"session reset: {why}", now, count_attempt=False)

    def _hello_consumer(self, route: list[bytes], message: Message, now: float) -> None:
        name = self._name(route[0])
        self._check_name(name, "consumer")
        if message.header.get("role", "consumer") != "consumer":
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the backend registers consumers only")
        old = self.consumers.get(name)
        if old is not None:  # what the old session held is released first
            restarted = message.header.get("previous") != old.token
            self._remove_consumer(name, "restarted" if restarted else "reset its session", now,
                                  rebalance=False, count_attempt=restarted)
        state = ConsumerSession(name=name, registered_at=now, last_seen=now)
        self.consumers[name] = state
        insort(self._order, name, key=consumer_order)
        self.log.info("consumer registered name=%s", name)
        self._send(Side.BACKEND, route[0], proto.encode(Command.WELCOME, self._welcome(state)))
        self._rebalance(now)

    def _fetch(self, route: list[bytes], message: Message, now: float) -> None:
        state = self._consumer(route, message, now)
        credit = proto.require(message.header, "credit", int)
        if credit < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "credit must be >= 0")
        state.credit = credit

    def _heartbeat_consumer(self, route: list[bytes], message: Message, now: float) -> None:
        self._consumer(route, message, now)

    def _bye_consumer(self, route: list[bytes], message: Message, now: float) -> None:
        state = self._consumer(route, message, now)
        self._remove_consumer(state.name, "said BYE", now, count_attempt=False)

    def _ack(self, route: list[bytes], message: Message, now: float) -> None:
        """Apply each partition's ACK on its own: a refused one changes nothing and is
        answered with ERR naming its partition, the others still count."""
        state = self._consumer(route, message, now)
        entries = proto.require(message.header, "acks", list)
        if len(entries) > len(self.partitions):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"an ACK names at most "
                                f"{len(self.partitions)} partitions, got {len(entries)}")
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "each ACK entry must be an object")
                self._ack_partition(state, entry)
            except ReplyError as exc:
                number = entry.get("partition") if isinstance(entry, dict) else None
                self._send_consumer(state, Command.ERR,
                                    proto.err_header(exc.code, exc.reason, partition=number), now)

    def _ack_partition(self, state: ConsumerSession, entry: dict[str, Any]) -> None:
        number = proto.require(entry, "partition", int)
        epoch = proto.require(entry, "epoch", int)
        runs = proto.require(entry, "offsets", list)
        dead = entry.get("dead") or []
        if not 0 <= number < len(self.partitions):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"no partition {number}")
        if not isinstance(dead, list):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "dead must be a list of offsets")
        settled = self.partitions[number].ack(state.name, epoch, runs, dead)
        if self.wal is not None:
            self.wal.ack(number, runs, dead)
        count = sum(run[1] for run in runs)
        state.acked += count
        self.counters["acked"] += count
        self.counters["dead"] += len(dead)
        self.dedupe.settle(number, settled.first, settled.ids, settled.dead)

    def _remove_consumer(self, name: str, why: str, now: float, *, rebalance: bool = True,
                         count_attempt: bool = True) -> None:
        """End ``name``'s session: release what it held (raising attempts unless it was not
        the records' fault) and move its partitions."""
        state = self.consumers.pop(name, None)
        if state is None:
            return
        self._order.remove(name)
        self._assigned.pop(name, None)
        self.log.info("consumer left name=%s reason=%s", name, why)
        targets = self._targets()
        for partition in self.partitions:
            if partition.owner == name or partition.target == name:
                partition.want_owner(targets.get(partition.number))
                if partition.owner == name:
                    released = partition.owner_gone(count_attempt)
                    self.counters["released"] += released
                    if released:
                        self.log.info("released records partition=%d count=%d",
                                      partition.number, released)
        if rebalance:
            self._rebalance(now)

    def _targets(self) -> dict[int, str]:
        """Round robin over the consumers in order: only the first ``partitions`` of them
        can own one, so a registration costs O(partitions) however many consumers there are."""
        count = len(self.partitions)
        return round_robin(count, self._order[:count]) if self._order else {}

    def _rebalance(self, now: float) -> None:
        targets = self._targets()
        for partition in self.partitions:
            partition.want_owner(targets.get(partition.number))
        assigned: dict[str, list[int]] = {}
        for number, name in sorted(targets.items()):
            assigned.setdefault(name, []).append(number)
        for name in set(self._assigned) | set(assigned):
            state = self.consumers.get(name)
            mine = assigned.get(name, [])
            if state is not None and mine != state.assigned:
                state.assigned = mine
                self.log.info("assignment consumer=%s partitions=%s", name, mine)
                self._send_consumer(state, Command.ASSIGN, {"partitions": mine}, now)
        self._assigned = assigned

    # -- delivery ----------------------------------------------------------------------------
    def deliver(self, now: float) -> None:
        """Hand pending records to owners that have credit.

        One RECORDS message per consumer carries a batch from each of its ready partitions
        (up to ``max_batch`` records and one frame of payload in all), so the message count
        does not grow with the number of partitions a consumer owns. A consumer with nothing
        in flight gets what is pending at once; one that is still storing gets only full
        batches (Nagle's rule): it cannot use records sooner than its transaction ends, and
        a few large messages cost both sides far less than many small ones. What is left
        goes when its in-flight records are acknowledged, so the wait is bounded by one
        transaction.
        """
        owners: dict[str, list[Partition]] = {}
        for partition in self.partitions:
            if partition.owner is not None:
                owners.setdefault(partition.owner, []).append(partition)
        max_batch = self.config.max_batch
        for name, owned in owners.items():
            state = self.consumers.get(name)
            if state is None:
                continue
            inflight = sum(p.inflight for p in owned)
            available = state.credit - inflight
            ready = [p for p in owned if not p.handing_over and p.pending]
            if available <= 0 or not ready:
                continue
            start = state.next_partition % len(ready)
            state.next_partition += 1
            order = ready[start:] + ready[:start]
            while available > 0:
                budget = min(available, max_batch)
                if inflight and sum(p.pending for p in order) < budget:
                    break
                room = MAX_FRAME_BYTES
                batches: list[tuple[Partition, Taken]] = []
                for partition in order:
                    taken = partition.take(budget, now, room)
                    if taken.ids:
                        batches.append((partition, taken))
                        budget -= len(taken.ids)
                        room -= sum(taken.sizes)
                        if budget <= 0 or room <= 0:
                            break
                if not batches:
                    break
                sent = sum(len(taken.ids) for _, taken in batches)
                available -= sent
                inflight += sent
                self._send_records(state, batches, now)

    def _send_records(self, state: ConsumerSession, batches: list[tuple[Partition, Taken]],
                      now: float) -> None:
        header_batches = []
        payloads: list[bytes] = []
        compact = proto.compact
        for partition, taken in batches:
            header_batches.append({
                "partition": partition.number, "epoch": partition.epoch,
                "offsets": taken.offsets, "ids": taken.ids, "keys": compact(taken.keys),
                "producers": compact(taken.producers), "created_us": compact(taken.created_us),
                "attempts": compact(taken.attempts), "sizes": compact(taken.sizes),
            })
            payloads.extend(taken.payloads)
        state.delivered += len(payloads)
        self.counters["delivered"] += len(payloads)
        self._send_consumer(state, Command.RECORDS, {"batches": header_batches}, now,
                            proto.join_payloads(payloads))

    # -- timers ------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Expire silent consumers and producers, end sessions that lost a message, release
        records in flight past their deadline, send heartbeats."""
        expiry = self.config.expiry_s
        for name, state in list(self.consumers.items()):
            if now - state.last_seen > expiry:
                self.counters["expired"] += 1
                silent = now - state.last_seen
                self._remove_consumer(name, f"expired: silent for {silent:.1f} s", now)
            elif (problem := state.overdue(now, expiry)) is not None:
                token = state.token
                self._end_session(state, problem, now)
                self._send(Side.BACKEND, name.encode(), proto.encode_err(
                    ErrorCode.NOT_REGISTERED, f"session reset: {problem}; say HELLO",
                    session=token))
        self._expire_deliveries(now)
        if self.wal is not None:
            self.wal.maybe_roll(self._positions())
            self.wal.delete_settled([p.head for p in self.partitions])
        waiting = {parked.route[0] for parked in self.parking}  # a REQ producer cannot send
        for identity, producer in list(self.producers.items()):  # heartbeats while it waits
            if now - producer.last_seen > expiry and identity not in waiting:
                del self.producers[identity]  # it says HELLO again when it comes back
                self.log.info("producer expired name=%s", producer.name)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_ms / 1000
            for state in self.consumers.values():
                self._send_consumer(state, Command.HEARTBEAT, {}, now)

    def _expire_deliveries(self, now: float) -> None:
        """Records in flight longer than ``ack_timeout_ms`` are released and delivered again;
        the owner is told, and its late ACK of the old epoch is refused."""
        deadline = now - self.config.ack_timeout_ms / 1000
        for partition in self.partitions:
            since = partition.oldest_delivery
            if since is None or since > deadline:
                continue
            owner = partition.owner
            released = partition.fence()
            self.counters["ack_timeouts"] += 1
            self.counters["released"] += released
            self.log.warning("ack timeout partition=%d owner=%s released=%d after %.1f s",
                             partition.number, owner, released, now - since)
            state = self.consumers.get(owner) if owner is not None else None
            if state is not None:
                self._send_consumer(state, Command.ERR, proto.err_header(
                    ErrorCode.ACK_TIMEOUT, f"records in flight for more than "
                    f"{self.config.ack_timeout_ms} ms were released",
                    partition=partition.number, epoch=partition.epoch), now)

    # -- status ------------------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Status of every partition, consumer and producer; called on the broker thread."""
        now = self.clock() if now is None else now
        partitions = [p.snapshot() for p in self.partitions]
        if self.wal is not None:
            for snap, disk in zip(partitions, self.wal.disk_use(), strict=True):
                snap.update(disk)
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
            "waiting_puts": len(self.parking),
            "held_ids": len(self.dedupe.held),
            "log": None if self.wal is None else {
                "dir": self.wal.directory, "fsync": self.wal.fsync.value,
                "syncs": self.wal.syncs, "synced_entries": self.wal.synced_entries,
                "segments": len(self.wal.segments), "recovered": self.recovered},
        }
