"""A pipelined producer client: several PUTs in flight on one DEALER socket.

Why: the ``Producer`` client's REQ socket waits out a whole round trip per request, and on a
small machine a round trip (its context switches) costs more CPU than the records it carries.
With a window of requests in flight a client's thread wakes once for several replies, and a
producer service finds several parts waiting each time its broker request returns, so it
forwards them as one: fewer round trips at every hop. Kafka's producer keeps 5 requests in
flight per connection by default for the same reason.

Wire: a request goes out as ``[tag, EMPTY, *body]``. The ROUTER it reaches (a producer
service's ingress or the broker's frontend) echoes everything before the delimiter in front of
its answer (``protocol.split_envelope``), so answers are matched by tag, in whatever order they
come. A tag names one send: the answer to an earlier try of a resent request is ignored, and
the record ids, fixed before the first try, make the resend idempotent at the broker (it
answers "duplicate" for what the first try had stored).

Reliability, per request, as the Guide's Lazy Pirate but without closing the socket (a DEALER
never gets stuck the way a REQ does): a request unanswered within ``timeout_ms`` is resent, at
most ``retries`` times; then the client fails over to its next endpoint with everything in
flight, and gives up (UNAVAILABLE) when none is left. Records refused with a retryable code
are sent again after an exponential backoff, until the request's deadline, without holding up
the rest of the window. Nothing here blocks except ``pump``, which waits at most its timeout,
and ``close``, which waits at most ``BYE_WAIT_MS`` for the answer to its BYE.

A request is one PUT: a batch whose frames would pass ``MAX_FRAME_BYTES`` is refused with
ConfigError by ``submit`` (the caller picks its batch size; ``Producer`` splits instead).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import zmq

from zmqlab import protocol as proto
from zmqlab.config import REPLY_TIMEOUT_MS
from zmqlab.errors import ConfigError, ErrorCode, ProtocolError, ZmqlabError
from zmqlab.node import NOBLOCK, new_socket, recv_frames, send_frames
from zmqlab.producer import (
    BYE_WAIT_MS,
    OutRecord,
    PutOutcome,
    Refusal,
    apply_put_reply,
    check_endpoint,
    client_name,
    encode_put,
    settle_refused,
)
from zmqlab.protocol import Command


class _Sent(Enum):
    """What a tag names besides a PUT request (``_Request``)."""

    HELLO = "hello"


@dataclass(slots=True)
class Completion:
    """A request that is over: what became of each of its records, and how long it took."""

    token: Any  # whatever the caller passed to ``submit``
    records: Sequence[OutRecord]
    outcome: PutOutcome
    latency_s: float  # first send to the last answer, backoffs and resends included


@dataclass(slots=True, eq=False)  # compared by identity: the window is a list of them
class _Request:
    token: Any
    records: Sequence[OutRecord]
    deadline: float
    first_sent: float
    todo: list[int]  # batch indices still waiting for an answer
    frames: list[bytes]  # the PUT of ``todo``, kept for resends
    delay: float  # the next backoff
    outcome: PutOutcome = field(default_factory=PutOutcome)
    tag: bytes | None = None  # the send awaiting an answer; None while backing off
    due: float = 0.0  # answer timeout, or when a backoff ends
    tries: int = 0  # sends of ``frames`` to the current endpoint


class PipelinedProducer:
    """Up to ``window`` PUTs in flight to one endpoint at a time, failing over down the list.

    Drive it from a poller loop: ``submit`` while ``free``; when ``socket`` is readable call
    ``handle_replies``; call ``tick`` by ``next_due()``. Each returns the requests that are
    over. ``pump`` does one round of all that for a caller without a loop of its own. The
    socket changes on failover, so a loop re-reads ``socket`` after every call.

    ConfigError at construction for endpoints, a window or a name that cannot work
    (``producer.check_name``), and from ``submit`` for a batch no PUT can carry.
    """

    def __init__(self, endpoints: Sequence[str] | str, *, name: str | None = None,
                 context: zmq.Context[Any] | None = None, window: int = 4,
                 timeout_ms: int = REPLY_TIMEOUT_MS, retries: int = 3,
                 deadline_s: float = 30.0, backoff_initial_s: float = 0.01,
                 backoff_max_s: float = 0.5) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ConfigError("at least one endpoint is needed")
        for endpoint in self.endpoints:
            check_endpoint(endpoint)
        if window < 1:
            raise ConfigError(f"window must be at least 1, got {window}")
        self.name = client_name(name)
        self.context: zmq.Context[Any] = context or zmq.Context.instance()
        self.window = window
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.deadline_s = deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = {"sent": 0, "acked": 0, "duplicates": 0, "resends": 0,
                      "backpressure_retries": 0, "refused": 0, "failovers": 0, "unsent": 0}
        self.partitions: int | None = None
        self.unavailable: str | None = None  # why the client gave up, once every endpoint failed
        self._index = 0
        self._tried: list[str] = []
        self._requests: list[_Request] = []
        self._by_tag: dict[bytes, _Request | _Sent] = {}
        self._next_tag = 0
        self.socket: zmq.Socket[Any] | None = None
        self._connect()

    # -- public ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    @property
    def free(self) -> int:
        """How many more requests ``submit`` takes now (0 once the client gave up)."""
        return 0 if self.unavailable else self.window - len(self._requests)

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def submit(self, records: Sequence[OutRecord], token: Any = None, *,
               now: float | None = None, deadline: float | None = None) -> None:
        """Send a batch (at once); its Completion comes from a later call.

        ``deadline`` (monotonic) bounds retries of refused records; by default ``deadline_s``
        from now. Raises ZmqlabError when the window is full or the client gave up.
        """
        if self.unavailable:
            raise ZmqlabError(self.unavailable)
        if len(self._requests) >= self.window:
            raise ZmqlabError(f"the window of {self.window} requests is full")
        now = time.monotonic() if now is None else now
        todo = list(range(len(records)))
        request = _Request(token, records, now + self.deadline_s if deadline is None
                           else deadline, now, todo, encode_put(records),
                           self.backoff_initial_s)
        self.stats["sent"] += len(records)
        self._requests.append(request)
        self._send(request, now)

    def next_due(self) -> float | None:
        """The earliest time ``tick`` has something to do (a timeout or a backoff's end)."""
        return min((r.due for r in self._requests), default=None)

    def handle_replies(self, now: float | None = None) -> list[Completion]:
        """Read every answer waiting on the socket (never blocks)."""
        done: list[Completion] = []
        sock = self.socket
        while sock is not None:
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                break
            now = time.monotonic() if now is None else now
            if len(frames) < 3 or frames[1] != proto.EMPTY:
                continue  # not an answer to anything we sent
            request = self._by_tag.pop(frames[0], None)
            if request is None:
                continue  # an answer to a try we already resent, or to a past endpoint
            try:
                reply = proto.decode(frames[2:])
            except ProtocolError as exc:
                reply = proto.Message(Command.ERR, {"code": exc.code, "reason": f"garbled "
                                                    f"answer: {exc.reason}"})
            if request is _Sent.HELLO:
                if reply.command is Command.WELCOME:
                    self.partitions = reply.header.get("partitions")
                continue  # a refused HELLO shows up as NOT_REGISTERED answers to the PUTs
            self._answered(request, reply, now, done)
        return done

    def tick(self, now: float | None = None) -> list[Completion]:
        """Resend what timed out, send what finished backing off, fail over if need be."""
        now = time.monotonic() if now is None else now
        done: list[Completion] = []
        for request in list(self._requests):
            if request.due > now or request not in self._requests:
                continue
            if request.tries > self.retries:  # this endpoint had all its tries
                self._fail_over(now, done)
                continue
            if request.tag is not None:  # no answer in time: the same records once more
                self._by_tag.pop(request.tag, None)
                self.stats["resends"] += 1
            self._send(request, now)  # (or a backoff ended)
        return done

    def pump(self, timeout_s: float) -> list[Completion]:
        """Wait at most ``timeout_s`` (less when a timeout or backoff is due) for answers."""
        now = time.monotonic()
        due = self.next_due()
        wait = timeout_s if due is None else max(0.0, min(timeout_s, due - now))
        done: list[Completion] = []
        if self.socket is not None and self.socket.poll(round(wait * 1000), zmq.POLLIN):
            done += self.handle_replies()
        done += self.tick()
        return done

    def close(self) -> None:
        """Say BYE, so the endpoint forgets this client now rather than expiring it later,
        then close. The BYE never blocks; its answer (which shows it went out) is waited for
        at most ``BYE_WAIT_MS``, and whatever else arrives meanwhile is dropped."""
        sock = self.socket
        if sock is not None and not self.unavailable:
            tag = self._tag()
            self._write(proto.envelope((tag,), proto.encode(Command.BYE)))
            deadline = time.monotonic() + BYE_WAIT_MS / 1000
            while (wait := deadline - time.monotonic()) > 0 and sock.poll(round(wait * 1000)):
                frames = recv_frames(sock)
                if frames[0] == tag:
                    break
        self._close_socket()

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def __enter__(self) -> PipelinedProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- inside ------------------------------------------------------------------------------
    def _tag(self) -> bytes:
        self._next_tag += 1
        return self._next_tag.to_bytes(8, "big")

    def _connect(self) -> None:
        self._close_socket()  # a silent endpoint: no BYE to wait for
        self._by_tag.clear()  # answers from the last endpoint are of no use now
        self.socket = new_socket(self.context, zmq.DEALER)
        self.socket.connect(self.endpoint)
        self._hello()

    def _hello(self) -> None:
        """Register; not waited for: PUTs queue behind it on the connection, which keeps
        order, and one sent before the answer is simply resent if refused NOT_REGISTERED."""
        tag = self._tag()
        self._by_tag[tag] = _Sent.HELLO
        self._write(proto.envelope((tag,), proto.encode_hello_producer(self.name)))

    def _write(self, frames: list[bytes]) -> None:
        assert self.socket is not None
        try:
            send_frames(self.socket, frames, NOBLOCK)
        except zmq.Again:  # the endpoint does not read: as a lost request, the timeout resends
            self.stats["unsent"] += 1

    def _send(self, request: _Request, now: float) -> None:
        tag = self._tag()
        request.tag = tag
        request.tries += 1
        request.due = now + self.timeout_ms / 1000
        self._by_tag[tag] = request
        self._write(proto.envelope((tag,), request.frames))

    def _answered(self, request: _Request, reply: proto.Message, now: float,
                  done: list[Completion]) -> None:
        if reply.command is Command.ERR and proto.error_of(reply)[0] == ErrorCode.NOT_REGISTERED:
            # The broker restarted or forgot us: HELLO again, then the same PUT (a try).
            self._hello()
            request.tag, request.due = None, now  # the next tick resends it, as a try
            self.stats["resends"] += 1
            return
        outcome = request.outcome
        dups_before = len(outcome.dups)
        try:
            failed = apply_put_reply(reply, request.todo, outcome)
        except ZmqlabError as exc:  # an answer that is no answer to a PUT
            code = str(getattr(exc, "code", ErrorCode.BAD_MESSAGE))
            failed = [(i, code, str(exc), False) for i in request.todo]
        self.stats["duplicates"] += len(outcome.dups) - dups_before
        retry = settle_refused(failed, request.records, outcome,
                               now + request.delay < request.deadline)
        if retry:
            self.stats["backpressure_retries"] += len(retry)
            request.todo = retry
            request.frames = encode_put([request.records[i] for i in retry])
            request.tag, request.tries = None, 0
            request.due = now + request.delay  # backoff, not synchronisation
            request.delay = min(request.delay * 2, self.backoff_max_s)
            return
        self._finish(request, now, done)

    def _finish(self, request: _Request, now: float, done: list[Completion]) -> None:
        self._requests.remove(request)
        if request.tag:
            self._by_tag.pop(request.tag, None)
        outcome = request.outcome
        self.stats["acked"] += outcome.acked
        self.stats["refused"] += len(outcome.refusals)
        done.append(Completion(request.token, request.records, outcome, now - request.first_sent))

    def _fail_over(self, now: float, done: list[Completion]) -> None:
        """Move everything in flight to the next endpoint, or give it all up as UNAVAILABLE."""
        self._tried.append(self.endpoint)
        if self._index + 1 < len(self.endpoints):
            self._index += 1
            self.stats["failovers"] += 1
            self._connect()
            for request in self._requests:
                request.tries = 0
                if request.tag is not None:  # backoffs keep their time
                    self._send(request, now)
            return
        self.unavailable = (f"no answer from {', '.join(self._tried)} ({self.retries + 1} "
                            f"tries of {self.timeout_ms} ms each)")
        for request in list(self._requests):
            request.outcome.refusals.extend(
                Refusal(request.records[i].id, ErrorCode.UNAVAILABLE, self.unavailable,
                        True) for i in request.todo)
            self._finish(request, now, done)
        self._close_socket()
