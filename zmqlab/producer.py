"""Producers: the ``Producer`` client (REQ, Lazy Pirate) and the producer service node.

The client talks the same PUT/ACK protocol to the broker's frontend or to a producer service's
ingress. It retries a silent endpoint by closing and reopening its REQ socket a bounded number
of times (the Guide's Lazy Pirate), and backs off and retries records refused with a retryable
code (a full partition, a broker not ready yet) until its deadline. Record ids are fixed before
the first try, so a retry after a lost reply is recognised by the broker as a duplicate instead
of being queued twice.

The producer service binds an ingress ROUTER for clients and forwards through one REQ socket:
everything that arrives while a request is at the broker goes out as the next request, one
part per client PUT, so REQ's lockstep becomes group commit; each client gets the broker's
answer to its own part once the broker acknowledged it. Parts and answers are forwarded as the
frames they came in: the service never re-encodes a record.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import repeat
from typing import Any, NamedTuple

import zmq

from zmqlab import protocol as proto
from zmqlab.config import REPLY_TIMEOUT_MS, ProducerConfig
from zmqlab.errors import (
    BrokerRejected,
    BrokerUnavailable,
    ConfigError,
    ErrorCode,
    ProtocolError,
    RecordsRefused,
    Refused,
    ReplyError,
)
from zmqlab.node import (
    NOBLOCK,
    Handler,
    Node,
    bind,
    new_socket,
    recv_frames,
    send_frames,
    send_reply,
    serve_requests,
)
from zmqlab.protocol import MAX_FRAME_BYTES, MAX_HEADER_BYTES, MAX_NAME_CHARS, Command

BYE_WAIT_MS = 250  # an answer to BYE comes at once; this bounds close() when the peer is gone
MAX_REREGISTRATIONS = 3  # NOT_REGISTERED answers one request may meet before it gives up
DROP_LOG_INTERVAL_S = 5.0  # at most one warning this often about replies dropped by the ingress


class OutRecord(NamedTuple):
    """A record ready to send: its payload is encoded JSON, its id fixed for retries.

    (Micro-optimization: NamedTuples, like Ack, because one is made per record and a
    NamedTuple is cheaper to build than a frozen dataclass.)
    """

    payload: bytes
    id: str
    key: str | None
    created_at: float


class Ack(NamedTuple):
    """Where the queue holds a record; ``duplicate`` when an earlier try already stored it."""

    id: str
    partition: int
    offset: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    id: str
    code: str
    reason: str
    retryable: bool


@dataclass(slots=True)
class PutOutcome:
    """What became of a batch: ``placed`` runs (record indices, partition, offset of the
    first), ``dups`` (index, partition, offset) for records an earlier try had stored, and
    ``refusals`` in the order they were decided."""

    placed: list[tuple[list[int], int, int]] = field(default_factory=list)
    dups: list[tuple[int, int, int]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return sum(len(indices) for indices, _, _ in self.placed) + len(self.dups)

    def acked_indices(self) -> list[int]:
        """Indices of the acknowledged records, ascending."""
        out = [i for indices, _, _ in self.placed for i in indices]
        out.extend(i for i, _, _ in self.dups)
        out.sort()
        return out

    def acks(self, records: Sequence[OutRecord]) -> list[Ack]:
        """An Ack per acknowledged record, in the records' order."""
        acks: dict[int, Ack] = {}
        for indices, partition, first in self.placed:
            # tuple.__new__ builds the NamedTuples in C (Ack(...) is a Python call)
            acks.update(zip(indices, map(tuple.__new__, repeat(Ack), zip(
                [records[i].id for i in indices], repeat(partition),
                range(first, first + len(indices)), repeat(False), strict=False)), strict=True))
        for i, partition, offset in self.dups:
            acks[i] = Ack(records[i].id, partition, offset, True)
        return [acks[i] for i in sorted(acks)]


def make_record(payload: Mapping[str, Any] | bytes | str, *, key: str | None = None,
                id: str | None = None, created_at: float | None = None) -> OutRecord:
    """Encode a payload (a JSON object, or its text) and give the record its id and time.

    ConfigError, before anything is sent, for what no PUT can carry: a payload larger than
    one frame (``MAX_FRAME_BYTES``), an id or key containing NUL (PostgreSQL cannot store NUL
    in text, so the broker refuses it).
    """
    if isinstance(payload, Mapping):
        try:  # strict as the broker is: no NaN, no lone surrogate (ValueError, both)
            data = json.dumps(payload, separators=(",", ":"), allow_nan=False,
                              ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"payload is not JSON: {exc}") from None
    elif isinstance(payload, str):
        data = payload.encode()
    elif isinstance(payload, bytes):
        data = payload
    else:
        raise ConfigError(f"payload must be a JSON object, got {type(payload).__name__}")
    if len(data) > MAX_FRAME_BYTES:
        raise ConfigError(f"a payload of {len(data)} bytes does not fit in one frame "
                          f"({MAX_FRAME_BYTES} bytes)")
    record_id = id or uuid.uuid4().hex
    _refuse_nul([record_id], [key])
    return OutRecord(data, record_id, key, time.time() if created_at is None else created_at)


def _refuse_nul(ids: Iterable[object], keys: Iterable[object]) -> None:
    # One join per column: a scan in C, not a Python loop per record.
    if "\x00" in "".join(map(str, ids)) or "\x00" in "".join(map(str, keys)):
        raise ConfigError("record ids and keys must not contain NUL (\\x00): PostgreSQL "
                          "cannot store it in text")


def encode_put(records: Sequence[OutRecord]) -> list[bytes]:
    """A one-part PUT: the columns ``ids``, ``keys``, ``created_us``, ``sizes`` (each a list,
    or one value shared by every record) and the payloads.

    ConfigError for a PUT that cannot be sent: an id or key that is not text or contains NUL,
    or a header or payload frame larger than ``MAX_FRAME_BYTES`` (ZeroMQ would drop the
    connection of whoever sent it; ``fitting_puts`` cuts a batch into PUTs that fit).
    """
    frames = _encode_put(records)
    largest = max(len(frames[2]), len(frames[3]))
    if largest > MAX_FRAME_BYTES:
        raise ConfigError(f"a PUT of {len(records)} record(s) needs a frame of {largest} bytes, "
                          f"more than one frame holds ({MAX_FRAME_BYTES}): send fewer at once")
    return frames


def fitting_puts(records: Sequence[OutRecord],
                 indices: list[int]) -> list[tuple[list[int], list[bytes]]]:
    """``records[indices]`` as PUTs whose frames fit (payload ``MAX_FRAME_BYTES``, header
    ``MAX_HEADER_BYTES``): (indices, frames) each, in order; a batch that does not fit is
    halved until it does.

    Everything is encoded before anything is sent, so a record no PUT can carry (ConfigError)
    refuses the whole batch, not its second half.
    """
    frames = _encode_put([records[i] for i in indices])
    if len(frames[2]) <= MAX_HEADER_BYTES and len(frames[3]) <= MAX_FRAME_BYTES:
        return [(indices, frames)]
    if len(indices) == 1:
        encode_put([records[indices[0]]])  # raises the ConfigError that says why
    half = len(indices) // 2
    return fitting_puts(records, indices[:half]) + fitting_puts(records, indices[half:])


def _encode_put(records: Sequence[OutRecord]) -> list[bytes]:
    payloads = [r.payload for r in records]
    created = [r.created_at for r in records]
    if created and created.count(created[0]) == len(created):  # made together: one time
        created_us: Any = round(created[0] * 1_000_000)
    else:
        created_us = [round(c * 1_000_000) for c in created]
    ids, keys = [r.id for r in records], [r.key for r in records]
    header = {"ids": ids, "keys": proto.compact(keys), "created_us": created_us,
              "sizes": proto.compact(list(map(len, payloads)))}
    try:
        frames = proto.encode(Command.PUT, header, proto.join_payloads(payloads))
    except (TypeError, ValueError) as exc:  # an id or key the wire cannot carry
        raise ConfigError(f"record ids and keys must be text (without lone surrogates): "
                          f"{exc}") from None
    _refuse_nul(ids, keys)
    return frames


def check_endpoint(endpoint: str) -> str:
    """An endpoint a client can connect to, or ConfigError now (not a hang later)."""
    if "://" not in endpoint:
        raise ConfigError(f"endpoint must look like tcp://127.0.0.1:8080, got {endpoint!r}")
    return endpoint


def check_name(name: str) -> str:
    """A producer name the broker and every database take, or ConfigError now: 1 to
    ``MAX_NAME_CHARS`` characters, no NUL (PostgreSQL cannot store it in text)."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS or "\x00" in name:
        raise ConfigError(f"producer name must be 1 to {MAX_NAME_CHARS} characters without "
                          f"NUL (\\x00), got {name!r:.80}")
    return name


def client_name(name: str | None) -> str:
    """The name a client registers with: the given one (checked), or one unique to this
    process."""
    if name is None:
        return f"client-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return check_name(name)


Failed = list[tuple[int, str, str, bool]]  # (record index, code, reason, retryable)


def apply_put_reply(reply: proto.Message, todo: Sequence[int], outcome: PutOutcome) -> Failed:
    """Add a PUT reply's acks and duplicates to ``outcome``; return the records it refused.

    ``todo`` holds the batch indices of the records the PUT carried, in order: the reply
    counts positions in the PUT, and a retried PUT carries only the records still refused.
    """
    if reply.command is Command.ERR or "code" in reply.header:
        code, reason, retryable = proto.error_of(reply)
        return [(i, code, reason, retryable) for i in todo]
    if reply.command is not Command.ACK:
        raise BrokerRejected(ErrorCode.BAD_MESSAGE,
                             f"unexpected reply {reply.command.name} to PUT")
    header = reply.header
    for index, count, partition, first in header.get("acks", []):
        outcome.placed.append((list(todo[index:index + count]), partition, first))
    outcome.dups.extend((todo[index], partition, offset)
                        for index, partition, offset in header.get("dups", []))
    return [(todo[e[0]], e[1], e[2], bool(e[3])) for e in header.get("errors", [])]


def settle_refused(failed: Failed, records: Sequence[OutRecord], outcome: PutOutcome,
                   may_retry: bool) -> list[int]:
    """The refused records to try again (retryable ones, while ``may_retry``), in order; the
    rest become ``outcome.refusals``, saying when a retryable refusal outlived the deadline."""
    retry: list[int] = []
    for i, code, reason, retryable in failed:
        if retryable and may_retry:
            retry.append(i)
        else:
            why = reason if not retryable else f"{reason} (still refused at the deadline)"
            outcome.refusals.append(Refusal(records[i].id, code, why, retryable))
    retry.sort()
    return retry


class Producer:
    """A blocking client for the broker's frontend or a producer service's ingress.

    ConfigError at construction for an endpoint or a name that cannot work (``check_name``).
    """

    def __init__(self, endpoint: str, *, name: str | None = None,
                 context: zmq.Context[Any] | None = None, timeout_ms: int = REPLY_TIMEOUT_MS,
                 retries: int = 3, deadline_s: float = 30.0, backoff_initial_s: float = 0.01,
                 backoff_max_s: float = 0.5) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.name = client_name(name)
        self.context: zmq.Context[Any] = context or zmq.Context.instance()
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.deadline_s = deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._sock: zmq.Socket[Any] | None = None
        self._poller = zmq.Poller()
        self._registered = False
        self.stats = {"sent": 0, "acked": 0, "duplicates": 0, "reconnects": 0,
                      "backpressure_retries": 0, "refused": 0}
        self.partitions: int | None = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket. A registered client says BYE first, so the broker forgets it now
        rather than expiring it later; the BYE never blocks and its answer is waited for at
        most ``BYE_WAIT_MS`` (the answer only shows that it went out before the close)."""
        sock = self._sock
        if sock is not None and self._registered:
            self._registered = False
            try:
                send_frames(sock, proto.encode(Command.BYE), NOBLOCK)
                sock.poll(min(self.timeout_ms, BYE_WAIT_MS), zmq.POLLIN)
            except zmq.ZMQError:  # not connected, or the REQ still waits for a reply
                pass
        self._drop_socket()

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._sock.close(0)
            self._sock = None
        self._registered = False  # a new socket is a new identity to the broker

    # -- Lazy Pirate -------------------------------------------------------------------------
    def _exchange(self, frames: list[bytes]) -> proto.Message | None:
        if self._sock is None:
            self._sock = new_socket(self.context, zmq.REQ)
            self._sock.connect(self.endpoint)
            self._poller.register(self._sock, zmq.POLLIN)
            self._registered = False
        sock = self._sock
        if sock.poll(self.timeout_ms, zmq.POLLOUT):  # no connection at all counts as silence
            send_frames(sock, frames, NOBLOCK)  # POLLOUT said it fits: never blocks
            if self._poller.poll(self.timeout_ms):
                return proto.decode(recv_frames(sock))
        self._drop_socket()  # a REQ that lost its reply is stuck: a new socket is the way out
        self.stats["reconnects"] += 1
        return None

    def request(self, frames: list[bytes], *, register: bool = True) -> proto.Message:
        """One request, retried on silence; registers (HELLO) first where needed.

        Only silence spends a try. A NOT_REGISTERED answer (the broker expired this client
        while it was idle, or restarted) is an answer: HELLO, then the same request again;
        after ``MAX_REREGISTRATIONS`` of them in one request, BrokerRejected.
        """
        tries = reregistrations = 0
        while tries <= self.retries:
            if register and not self._registered:
                welcome = self._exchange(proto.encode_hello_producer(self.name))
                if welcome is None:
                    tries += 1
                    continue
                if welcome.command is Command.ERR:
                    raise BrokerRejected(*proto.error_of(welcome)[:2])
                self._registered = True
                self.partitions = welcome.header.get("partitions")
            reply = self._exchange(frames)
            if reply is None:
                tries += 1
                continue
            if (register and reply.command is Command.ERR
                    and proto.error_of(reply)[0] == ErrorCode.NOT_REGISTERED):
                reregistrations += 1
                if reregistrations > MAX_REREGISTRATIONS:
                    raise BrokerRejected(*proto.error_of(reply)[:2])
                self._registered = False  # the broker restarted or forgot us: HELLO again
                continue
            return reply
        raise BrokerUnavailable(f"no answer from {self.endpoint} after {self.retries + 1} "
                                f"tries of {self.timeout_ms} ms")

    # -- records -------------------------------------------------------------------------------
    def send(self, payload: Mapping[str, Any] | bytes | str, *, key: str | None = None,
             id: str | None = None) -> Ack:
        return self.send_batch([make_record(payload, key=key, id=id)])[0]

    def send_batch(self, records: Sequence[OutRecord],
                   sleep: Callable[[float], None] = time.sleep) -> list[Ack]:
        """Send records; return an Ack per record, in order.

        Records refused with a retryable code are retried with exponential backoff until
        ``deadline_s``; a refusal that is final (or outlives the deadline) raises
        RecordsRefused carrying the acks of the records that did get in.
        """
        outcome = self.put_batch(records, sleep)
        if outcome.refusals:
            raise RecordsRefused(outcome.refusals, outcome.acks(records))
        return outcome.acks(records)

    def put_batch(self, records: Sequence[OutRecord],
                  sleep: Callable[[float], None] = time.sleep) -> PutOutcome:
        """``send_batch`` without an object per record: where each run of records went, and
        the refusals. For callers that send many records and need only counts (the load
        generator), because building an Ack per record is the costly part of the bookkeeping.

        A batch whose frames would pass ``MAX_FRAME_BYTES`` goes as several PUTs, one after
        the other (``fitting_puts``); ConfigError, before anything is sent, for a record
        that no PUT can carry.
        """
        deadline = time.monotonic() + self.deadline_s
        outcome = PutOutcome()
        puts = fitting_puts(records, list(range(len(records))))
        self.stats["sent"] += len(records)
        for todo, frames in puts:
            self._put(records, todo, frames, outcome, deadline, sleep)
        self.stats["acked"] += outcome.acked
        self.stats["refused"] += len(outcome.refusals)
        return outcome

    def _put(self, records: Sequence[OutRecord], todo: list[int], frames: list[bytes],
             outcome: PutOutcome, deadline: float, sleep: Callable[[float], None]) -> None:
        """One PUT, then its refused records again after a backoff until settled."""
        delay = self.backoff_initial_s
        while todo:
            reply = self.request(frames)
            dups_before = len(outcome.dups)
            failed = apply_put_reply(reply, todo, outcome)
            self.stats["duplicates"] += len(outcome.dups) - dups_before
            todo = settle_refused(failed, records, outcome,
                                  time.monotonic() + delay < deadline)
            if todo:
                self.stats["backpressure_retries"] += len(todo)
                sleep(delay)  # backoff between tries, not synchronisation
                delay = min(delay * 2, self.backoff_max_s)
                frames = encode_put([records[i] for i in todo])

    def status(self) -> dict[str, Any]:
        """The STATS snapshot of whatever this client talks to."""
        reply = self.request(proto.encode(Command.STATS), register=False)
        if reply.command is not Command.STATS:
            raise BrokerRejected(*proto.error_of(reply)[:2])
        return reply.header


# -- the producer service ----------------------------------------------------------------------
@dataclass
class _ClientPut:
    """A client's PUT part, kept as the frames it came in: forwarded, never re-encoded."""

    route: list[bytes]  # the client's identity and request tag, echoed in front of the answer
    count: int
    header: bytes
    blob: bytes


@dataclass
class _InFlight:
    puts: list[_ClientPut]
    frames: list[bytes]
    tries: int = 0


class Awaiting(Enum):
    """What the upstream REQ socket waits for; REQ is lockstep, so this names the next reply.
    The value is how log lines call it."""

    HELLO = "hello"
    PUT = "put"
    HEARTBEAT = "heartbeat"


@dataclass
class _Upstream:
    """The REQ conversation with the broker: what we wait for (None: nothing), since when."""

    awaiting: Awaiting | None = None
    sent_at: float = 0.0
    registered: bool = False
    batch: _InFlight | None = None
    pending: deque[_ClientPut] = field(default_factory=deque)
    pending_records: int = 0
    pending_bytes: int = 0  # payload bytes of ``pending``
    # The broker's timing, from its WELCOME (None until then): one truth for both sides.
    heartbeat_s: float | None = None
    expiry_s: float | None = None  # heartbeat × liveness: silence the broker tolerates


# ``handler(reply, frames, ingress)``: the broker's decoded reply, its frames (forwarded as
# they came) and the ingress to answer clients on.
UpstreamHandler = Callable[[proto.Message, list[bytes], zmq.Socket[Any] | None], None]


class ProducerService(Node):
    """Ingress for clients, one REQ upstream with Lazy Pirate retries and heartbeats.

    No peer can stall it: every send is non-blocking; a reply to a client whose pipe is full
    (or who left) is dropped, counted and logged, and that client's own timeout and retry
    cover it. What it holds for the broker is bounded in records (``max_pending``) and payload
    bytes (``max_pending_bytes``): past either, a PUT is refused UNAVAILABLE (retryable).
    It heartbeats the broker, and times it out, by the broker's WELCOME
    (``heartbeat_ms``, ``liveness``); ``config.heartbeat_ms`` serves only until then.
    """

    kind = "producer"

    def __init__(self, config: ProducerConfig, *, context: zmq.Context[Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(context)
        check_name(config.name)
        self.config = config
        self.clock = clock
        self.up = _Upstream()
        self.partitions: int | None = None
        self.stats = {"received": 0, "acked": 0, "refused": 0, "batches": 0, "reconnects": 0,
                      "unavailable": 0, "dropped_replies": 0}
        self._req: zmq.Socket[Any] | None = None
        self._last_reply = 0.0
        self._next_drop_log = 0.0
        # One dispatch table per socket: client requests by command, broker replies by what
        # the REQ socket was waiting for.
        self._client_handlers: dict[Command, Handler] = {
            Command.PUT: self._handle_put,
            Command.HELLO: self._handle_hello,
            Command.STATS: self._handle_stats,
            Command.HEARTBEAT: self._handle_echo,
            Command.BYE: self._handle_echo,
        }
        self._upstream_handlers: dict[Awaiting, UpstreamHandler] = {
            Awaiting.HELLO: self._handle_welcome,
            Awaiting.PUT: self._handle_put_reply,
            Awaiting.HEARTBEAT: self._handle_heartbeat_reply,
        }

    def serve(self, control: zmq.Socket[Any]) -> None:
        ingress = None
        try:
            if self.config.ingress is not None:
                # Mandatory: a full client pipe is an error we log, not a silent drop.
                ingress = new_socket(self.context, zmq.ROUTER, router_mandatory=1)
                bind(ingress, self.config.ingress, f"producer {self.config.name} ingress")
            self._connect()
            self.log.info("producer %s ingress=%s broker=%s", self.config.name,
                          self.config.ingress, self.config.broker)
            self.bound()
            self._loop(control, ingress)
        finally:
            if self._req is not None:
                self._req.close(0)
            if ingress is not None:
                ingress.close(0)

    def _connect(self) -> None:
        if self._req is not None:
            self._req.close(0)
        self._req = new_socket(self.context, zmq.REQ)
        self._req.connect(self.config.broker)
        self.up.registered = False
        self._upstream(proto.encode_hello_producer(self.config.name), Awaiting.HELLO)

    def _upstream(self, frames: list[bytes], awaiting: Awaiting) -> None:
        assert self._req is not None
        try:
            send_frames(self._req, frames, NOBLOCK)
        except zmq.Again:  # no broker connection at all: the reply timeout reconnects us
            self.log.debug("broker not connected; %s not sent", awaiting.value)
        self.up.awaiting = awaiting
        self.up.sent_at = self.clock()

    def _loop(self, control: zmq.Socket[Any], ingress: zmq.Socket[Any] | None) -> None:
        poller, polled = zmq.Poller(), None
        while True:
            if polled is not self._req:  # a reconnect replaced the REQ socket
                poller = zmq.Poller()
                for sock in (control, ingress, self._req):
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
                polled = self._req
            events = dict(poller.poll(self.config.tick_ms))
            if control in events:
                return
            if ingress is not None and ingress in events:
                serve_requests(ingress, self._client_handlers, log=self.log,
                               unknown="{command} is not a client command",
                               dropped=self._dropped)
            if self._req is not None and self._req in events:
                reply = recv_frames(self._req)
                self._handle_upstream(reply, ingress)
            self._tick(self.clock(), ingress)

    # -- clients -----------------------------------------------------------------------------
    def _handle_put(self, route: list[bytes], message: proto.Message) -> list[bytes] | None:
        # The broker checks every record (a bad part spoils only that client's part); here
        # only what forwarding the part needs: its size and its one payload frame.
        count = len(proto.require(message.header, "ids", list))
        if len(message.payloads) != 1:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a PUT carries one payload frame "
                                f"(the records back to back), got {len(message.payloads)}")
        if not count:
            return proto.encode(Command.ACK, {"acks": [], "dups": [], "errors": []})
        blob = message.payloads[0]
        up = self.up
        if (up.pending_records + count > self.config.max_pending
                or up.pending_bytes + len(blob) > self.config.max_pending_bytes):
            raise Refused(ErrorCode.UNAVAILABLE, f"producer {self.config.name} already holds "
                          f"{up.pending_records} records ({up.pending_bytes} payload bytes) "
                          "for the broker; retry later")
        self.stats["received"] += count
        up.pending.append(_ClientPut(route, count, message.raw_header, blob))
        up.pending_records += count
        up.pending_bytes += len(blob)
        return None  # answered when the broker acknowledges

    def _handle_hello(self, _route: list[bytes], _message: proto.Message) -> list[bytes]:
        return proto.encode(Command.WELCOME, {"name": self.config.name,
                                              "partitions": self.partitions,
                                              "broker": self.up.registered})

    def _handle_stats(self, _route: list[bytes], _message: proto.Message) -> list[bytes]:
        return proto.encode(Command.STATS, self.snapshot())

    def _handle_echo(self, _route: list[bytes], message: proto.Message) -> list[bytes]:
        """HEARTBEAT and BYE: answered with themselves (a REQ client needs a reply)."""
        return proto.encode(message.command)

    # -- upstream ------------------------------------------------------------------------------
    def _handle_upstream(self, frames: list[bytes], ingress: zmq.Socket[Any] | None) -> None:
        awaiting, self.up.awaiting = self.up.awaiting, None
        self._last_reply = self.clock()
        try:
            reply = proto.decode(frames)
        except ReplyError as exc:
            reply = proto.Message(Command.ERR, {"code": exc.code, "reason": exc.reason})
        if (reply.command is Command.ERR
                and proto.error_of(reply)[0] == ErrorCode.NOT_REGISTERED):
            self.up.registered = False
            self._upstream(proto.encode_hello_producer(self.config.name), Awaiting.HELLO)
            return
        if awaiting is not None:
            self._upstream_handlers[awaiting](reply, frames, ingress)

    def _handle_welcome(self, reply: proto.Message, _frames: list[bytes],
                        _ingress: zmq.Socket[Any] | None) -> None:
        if reply.command is Command.WELCOME:
            self.up.registered = True
            self.partitions = reply.header.get("partitions")
            self._take_timing(reply.header)
            self.log.info("producer %s registered with broker", self.config.name)
        else:
            self.log.warning("broker refused registration: %s", reply.header)

    def _handle_put_reply(self, reply: proto.Message, frames: list[bytes],
                          ingress: zmq.Socket[Any] | None) -> None:
        if self.up.batch is not None:
            batch, self.up.batch = self.up.batch, None
            self._answer(batch, reply, ingress, frames)

    def _handle_heartbeat_reply(self, _reply: proto.Message, _frames: list[bytes],
                                _ingress: zmq.Socket[Any] | None) -> None:
        """Nothing to do: hearing from the broker is what a heartbeat asks for."""

    def _take_timing(self, welcome: dict[str, Any]) -> None:
        """The broker's ``heartbeat_ms`` and ``liveness``, when its WELCOME has them (both
        positive integers), so that this side never lets the broker expire it."""
        heartbeat_ms, liveness = welcome.get("heartbeat_ms"), welcome.get("liveness")
        if (type(heartbeat_ms) is int and type(liveness) is int
                and heartbeat_ms > 0 and liveness > 0):
            self.up.heartbeat_s = heartbeat_ms / 1000
            self.up.expiry_s = heartbeat_ms * liveness / 1000

    def _reply_timeout_s(self, awaiting: Awaiting) -> float:
        """How long the broker may take to answer: a PUT may wait for room there, so the
        configured reply timeout; a broker answers a heartbeat at once, so no longer than the
        silence it tolerates itself."""
        timeout_s = self.config.timeout_ms / 1000
        if awaiting is Awaiting.HEARTBEAT and self.up.expiry_s is not None:
            return min(timeout_s, self.up.expiry_s)
        return timeout_s

    def _dropped(self, route: list[bytes]) -> None:
        """A reply the ingress could not send (the client's pipe is full, or it left): counted
        and logged, at most once per ``DROP_LOG_INTERVAL_S`` so a client that floods us
        cannot flood the log too."""
        self.stats["dropped_replies"] += 1
        now = self.clock()
        if now >= self._next_drop_log:
            self._next_drop_log = now + DROP_LOG_INTERVAL_S
            self.log.warning("reply to client %s dropped: its pipe is full or it left (%d "
                             "dropped so far; its own timeout and retry cover it)",
                             route[0].hex(), self.stats["dropped_replies"])

    def _answer(self, batch: _InFlight, reply: proto.Message,
                ingress: zmq.Socket[Any] | None, frames: list[bytes] | None = None) -> None:
        """Hand each client the broker's answer to its part, as the broker wrote it."""
        bodies = frames[2:] if frames is not None and reply.command is Command.ACK else []
        replies: list[list[bytes]]
        if reply.command is Command.ACK and len(bodies) == len(batch.puts):
            replies = []
            for body in bodies:
                try:
                    answer = proto.parse_header(body)  # small: runs, not a list per record
                except ProtocolError as exc:  # its client retries (ids make that safe); the
                    self.stats["refused"] += 1  # other parts are answered as usual
                    replies.append(proto.encode_err(ErrorCode.UNAVAILABLE, f"the broker's "
                                                    f"answer to this part is unreadable "
                                                    f"({exc.reason}); retry"))
                    continue
                if "code" in answer:  # the broker refused this part as a whole
                    self.stats["refused"] += 1
                    replies.append(proto.encode_parts(Command.ERR, [body]))
                    continue
                self.stats["acked"] += (sum(run[1] for run in answer.get("acks", []))
                                        + len(answer.get("dups", [])))
                self.stats["refused"] += len(answer.get("errors", []))
                replies.append(proto.encode_parts(Command.ACK, [body]))
        else:
            if reply.command is Command.ERR:
                error = proto.encode_err(*proto.error_of(reply)[:2])
            else:
                error = proto.encode_err(ErrorCode.INTERNAL, f"broker answered "
                                         f"{reply.command.name} with {len(bodies)} part(s) for "
                                         f"{len(batch.puts)}")
            replies = [error] * len(batch.puts)
        if ingress is not None:
            for put, answer_frames in zip(batch.puts, replies, strict=True):
                if not send_reply(ingress, put.route, answer_frames):
                    self._dropped(put.route)

    def _tick(self, now: float, ingress: zmq.Socket[Any] | None) -> None:
        up = self.up
        if up.awaiting is not None:
            timeout_s = self._reply_timeout_s(up.awaiting)
            if now - up.sent_at < timeout_s:
                return
            self.stats["reconnects"] += 1
            self.log.warning("broker did not answer %s within %d ms: reconnecting",
                             up.awaiting.value, round(timeout_s * 1000))
            if up.batch is not None:
                up.batch.tries += 1
                if up.batch.tries > self.config.retries:
                    self.stats["unavailable"] += sum(p.count for p in up.batch.puts)
                    unavailable = proto.Message(Command.ERR, {
                        "code": ErrorCode.UNAVAILABLE,
                        "reason": f"broker {self.config.broker} did not answer "
                                  f"{self.config.retries + 1} tries"})
                    batch, up.batch = up.batch, None
                    self._answer(batch, unavailable, ingress)
            self._connect()
            return
        if not up.registered:
            if now - up.sent_at >= self.config.timeout_ms / 1000:
                self._connect()
            return
        if up.batch is not None:  # resend after a reconnect; ids make it idempotent
            self._upstream(up.batch.frames, Awaiting.PUT)
        elif up.pending:
            self._send_batch()
        elif now - max(up.sent_at, self._last_reply) >= self._heartbeat_s():
            self._upstream(proto.encode(Command.HEARTBEAT), Awaiting.HEARTBEAT)

    def _heartbeat_s(self) -> float:
        if self.up.heartbeat_s is not None:
            return self.up.heartbeat_s
        return self.config.heartbeat_ms / 1000

    def _send_batch(self) -> None:
        up = self.up
        taken: list[_ClientPut] = []
        count = size = 0
        limit = self.config.max_batch
        # At most max_batch records and one frame's worth of payloads per request (at least
        # one part), so one request never holds the broker's whole backlog.
        while up.pending and (not taken or (count + up.pending[0].count <= limit
                                            and size + len(up.pending[0].blob)
                                            <= MAX_FRAME_BYTES)):
            put = up.pending.popleft()
            taken.append(put)
            count += put.count
            size += len(put.blob)
        up.pending_records -= count
        up.pending_bytes -= size
        frames = proto.encode_parts(Command.PUT, [f for put in taken for f in (put.header,
                                                                               put.blob)])
        up.batch = _InFlight(taken, frames)
        self.stats["batches"] += 1
        self._upstream(frames, Awaiting.PUT)

    def snapshot(self) -> dict[str, Any]:
        batch = self.up.batch
        return {"name": self.config.name, "broker": self.config.broker,
                "registered": self.up.registered,
                "pending": self.up.pending_records,
                "pending_bytes": self.up.pending_bytes,
                "max_pending": self.config.max_pending,  # the bounds beside what they bound
                "max_pending_bytes": self.config.max_pending_bytes,
                "inflight": 0 if batch is None else sum(p.count for p in batch.puts),
                **self.stats}
