"""The queue service: partitioned ring buffers between a producer ROUTER and a consumer ROUTER.

One thread, one poller, one dispatch table per socket, timers after the poll (the Majordomo
broker's shape). Handlers never touch sockets: they return their reply or append messages to
an outbox that the loop flushes, so tests drive ``handle_frontend``/``handle_backend``/
``tick`` with fake time and frames and read the outbox.

A record enters a partition on PUT (and only then is the producer acknowledged), is handed to
the partition's owner when that consumer has credit, and leaves the partition only on the
owner's ACK for the current epoch. Beside the broker: ``Intake`` checks and places a PUT's
records, ``DedupeWindow`` knows the ids held and recently acknowledged, ``Parking`` holds
PUTs that wait for room, ``Partition`` is one ring and its lease.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import zmq

from zmqlab import protocol as proto
from zmqlab.assignment import consumer_order, round_robin
from zmqlab.config import REPLY_TIMEOUT_MS, BrokerConfig
from zmqlab.dedupe import DedupeWindow
from zmqlab.errors import ErrorCode, ProtocolError, Refused, ReplyError
from zmqlab.intake import Intake
from zmqlab.node import NOBLOCK, Node, bind, new_socket, recv_frames, send_frames
from zmqlab.parking import ParkedPut, Parking, Part
from zmqlab.partition import Partition, Taken
from zmqlab.protocol import Command, Message

READ_PER_POLL = 256  # messages read per socket per wake-up before timers and delivery run

Handler = Callable[[list[bytes], Message, float], "list[bytes] | None"]
"""``handler(route, message, now)``: the reply frames, or None (answered later, or nothing)."""


class Side(Enum):
    """Which socket a message goes out on."""

    FRONTEND = "frontend"  # producers and status clients
    BACKEND = "backend"  # consumers


@dataclass
class ConsumerState:
    name: str
    registered_at: float
    last_seen: float
    credit: int = 0
    assigned: list[int] = field(default_factory=list)
    delivered: int = 0
    acked: int = 0
    next_partition: int = 0  # round-robin start among its partitions when delivering


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
        self.intake = Intake(self.partitions, self.dedupe, self.config.max_payload_bytes)
        self.parking = Parking()
        self.consumers: dict[str, ConsumerState] = {}
        self.producers: dict[bytes, ProducerState] = {}
        self._producer_names: set[str] = set()
        self._consumer_names: set[str] = set()
        self.outbox: list[tuple[Side, list[bytes]]] = []
        self.started_at = clock()
        self._next_heartbeat = 0.0
        self.stopping_until: float | None = None  # set by stop(): drain, then exit
        self.counters = {"put": 0, "duplicates": 0, "refused": 0, "delivered": 0, "acked": 0,
                         "released": 0, "expired": 0, "dead": 0, "waited": 0}
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
        while self.outbox:
            outbox, self.outbox = self.outbox, []
            for side, frames in outbox:
                try:
                    send_frames(sockets[side], frames)
                except zmq.ZMQError as exc:
                    if side is Side.FRONTEND:
                        self.log.warning("reply to a producer that is gone dropped: %s", exc)
                    else:  # EHOSTUNREACH thanks to ROUTER_MANDATORY: the consumer is gone
                        name = frames[0].decode(errors="replace")
                        if name in self.consumers:
                            self.counters["expired"] += 1
                            self._remove_consumer(name, f"unreachable ({exc})", now)
                            self.deliver(now)

    def _send(self, side: Side, identity: bytes, frames: list[bytes]) -> None:
        self.outbox.append((side, proto.envelope((identity,), frames)))

    # -- dispatch ----------------------------------------------------------------------------
    def handle_frontend(self, frames: list[bytes], now: float) -> None:
        """Handle one message from a producer or status client; each gets one reply."""
        self._handle(Side.FRONTEND, self._frontend, frames, now)

    def handle_backend(self, frames: list[bytes], now: float) -> None:
        """Handle one message from a consumer; only errors are answered directly."""
        self._handle(Side.BACKEND, self._backend, frames, now)

    def _handle(self, side: Side, table: dict[Command, Handler], frames: list[bytes],
                now: float) -> None:
        try:
            route, body = proto.split_envelope(frames)
        except ProtocolError as exc:
            self.log.warning("%s: dropped malformed envelope: %s", side.value, exc.reason)
            return
        if side is Side.BACKEND:
            route = route[:1]  # a consumer's DEALER sends no request tags
        self._answer(side, route, self._dispatch, table, route, body, now)

    def _dispatch(self, table: dict[Command, Handler], route: list[bytes], body: list[bytes],
                  now: float) -> list[bytes] | None:
        message = proto.decode(body)
        handler = table.get(message.command)
        if handler is None:
            role = "producer" if table is self._frontend else "consumer"
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                f"{message.command.name} is not a {role} command")
        return handler(route, message, now)

    def _answer(self, side: Side, route: list[bytes], handle: Callable[..., list[bytes] | None],
                *args: Any) -> None:
        """Send ``handle(*args)``'s reply along ``route``: the reply (None: nothing, or later),
        ERR for a refusal, INTERNAL for anything unexpected; the loop carries on."""
        try:
            reply = handle(*args)
        except ReplyError as exc:
            reply = proto.encode_err(exc.code, exc.reason)
        except Exception as exc:  # keep serving; the peer learns something went wrong
            self.log.exception("%s: internal error", side.value)
            reply = proto.encode_err(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if reply is not None:
            self.outbox.append((side, proto.envelope(route, reply)))

    def _welcome(self) -> dict[str, Any]:
        return {"partitions": self.config.partitions, "heartbeat_ms": self.config.heartbeat_ms,
                "liveness": self.config.liveness, "ready": self._not_ready() is None}

    def _not_ready(self) -> str | None:
        missing_p = self.config.expect_producers - len(self._producer_names)
        missing_c = self.config.expect_consumers - len(self._consumer_names)
        if missing_p <= 0 and missing_c <= 0:
            return None
        return (f"waiting for {max(missing_p, 0)} more producer(s) and {max(missing_c, 0)} more "
                "consumer(s) to register")

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
        if held:
            self.log.warning("broker stopped holding %d record(s) that no consumer stored: they "
                             "are lost (the broker keeps records in memory)", held)
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
        if route[0] not in self.producers:
            self.log.info("producer registered name=%s", name)
        self.producers[route[0]] = ProducerState(name=name, last_seen=now)
        self._producer_names.add(name)
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
        and consumers can still make room (see ``zmqlab.parking``)."""
        self._producer(route, now)
        self._check_open()
        parts: list[Part] = []
        for header, blob in proto.put_parts(message):
            try:
                parts.append((proto.parse_header(header), blob))
            except ProtocolError as exc:
                parts.append((exc, blob))
        if self.config.put_wait_ms and self.consumers and not self.parking.full:
            need = self.intake.need([h for h, _ in parts if isinstance(h, dict)])
            if need is not None:
                self.parking.park(ParkedPut(route, parts,
                                            now + self.config.put_wait_ms / 1000, need))
                self.counters["waited"] += 1
                return None
        return self._store_parts(route, parts, now)

    def unpark(self, now: float) -> None:
        """Answer parked PUTs that fit now or whose wait is over, oldest first."""
        def answer(put: ParkedPut) -> None:
            self._answer(Side.FRONTEND, put.route, self._store_parts, put.route, put.parts, now)

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
    def _name(route: list[bytes]) -> str:
        try:
            return route[0].decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                "consumer identity must be UTF-8 text") from None

    def _consumer(self, route: list[bytes], now: float) -> ConsumerState:
        state = self.consumers.get(self._name(route))
        if state is None:
            raise Refused(ErrorCode.NOT_REGISTERED, "say HELLO before anything else")
        state.last_seen = now
        return state

    def _hello_consumer(self, route: list[bytes], message: Message, now: float) -> None:
        name = self._name(route)
        if message.header.get("role", "consumer") != "consumer":
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the backend registers consumers only")
        if name in self.consumers:  # it restarted or lost us: what it held is released first
            self._remove_consumer(name, "registered again", now, rebalance=False)
        self.consumers[name] = ConsumerState(name=name, registered_at=now, last_seen=now)
        self._consumer_names.add(name)
        self.log.info("consumer registered name=%s", name)
        self._send(Side.BACKEND, route[0], proto.encode(Command.WELCOME, self._welcome()))
        self._rebalance()

    def _fetch(self, route: list[bytes], message: Message, now: float) -> None:
        state = self._consumer(route, now)
        credit = proto.require(message.header, "credit", int)
        if credit < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "credit must be >= 0")
        state.credit = credit

    def _heartbeat_consumer(self, route: list[bytes], message: Message, now: float) -> None:
        self._consumer(route, now)

    def _bye_consumer(self, route: list[bytes], message: Message, now: float) -> None:
        state = self._consumer(route, now)
        self._remove_consumer(state.name, "said BYE", now)

    def _ack(self, route: list[bytes], message: Message, now: float) -> None:
        """Apply each partition's ACK on its own: a refused one changes nothing and is
        answered with ERR, the others still count."""
        state = self._consumer(route, now)
        entries = proto.require(message.header, "acks", list)
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise ProtocolError(ErrorCode.BAD_MESSAGE, "each ACK entry must be an object")
                self._ack_partition(state, entry)
            except ReplyError as exc:
                number = entry.get("partition") if isinstance(entry, dict) else None
                self._send(Side.BACKEND, route[0],
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
        self.dedupe.settle(number, first, removed, dead)

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
                self._send(Side.BACKEND, name.encode(),
                           proto.encode(Command.ASSIGN, {"partitions": assigned}))

    # -- delivery ----------------------------------------------------------------------------
    def deliver(self, now: float) -> None:
        """Hand pending records to owners that have credit.

        One RECORDS message per consumer carries a batch from each of its ready partitions
        (up to ``max_batch`` records in all), so the message count does not grow with the
        number of partitions a consumer owns. A consumer with nothing in flight gets what is
        pending at once; one that is still storing gets only full batches (Nagle's rule): it
        cannot use records sooner than its transaction ends, and a few large messages cost
        both sides far less than many small ones (see docs/performance.md). What is left
        goes when its in-flight records are acknowledged, so the wait is bounded by one
        transaction.
        """
        max_batch = self.config.max_batch
        for state in self.consumers.values():
            owned = [p for p in self.partitions if p.owner == state.name]
            if not owned:
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
        self._send(Side.BACKEND, state.name.encode(), proto.encode(
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
        waiting = {parked.route[0] for parked in self.parking}  # a REQ producer cannot send
        for identity, producer in list(self.producers.items()):  # heartbeats while it waits
            if now - producer.last_seen > expiry and identity not in waiting:
                del self.producers[identity]  # it says HELLO again when it comes back
                self.log.info("producer expired name=%s", producer.name)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_ms / 1000
            for name in self.consumers:
                self._send(Side.BACKEND, name.encode(), proto.encode(Command.HEARTBEAT))

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
            "waiting_puts": len(self.parking),
            "held_ids": len(self.dedupe.held),
        }
