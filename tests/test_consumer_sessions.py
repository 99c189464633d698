"""Consumer sessions (docs/sessions.md, wire ZQL4) against a scripted broker.

A real ``Consumer`` runs on its own thread over inproc; the test plays the broker on a ROUTER,
one message at a time, so every rule of the consumer's side is checked without the broker:
timing from WELCOME, session and numbering on every message, resets on a gap or on silence,
answers about older sessions ignored, ACK_TIMEOUT, and records stored nowhere.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import pytest
import zmq
from helpers import recv, stored_rows, wait_until

from zmqlab import protocol as proto
from zmqlab.config import ConsumerConfig
from zmqlab.consumer import Consumer
from zmqlab.errors import SinkUnavailable
from zmqlab.protocol import Command
from zmqlab.store import Sink, make_engine


class ScriptedBroker:
    """The broker's side of a consumer session, played by the test on a ROUTER."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the broker: a reconnect takes over
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.identity = b"9090"
        self.session = ""
        self.seq = 0  # the broker's count in the current session
        self.log: list[proto.Message] = []  # everything the consumer sent, in order

    def close(self) -> None:
        self.sock.close(0)

    def receive(self, timeout_s: float = 5.0) -> proto.Message:
        frames = recv(self.sock, timeout_s)
        assert frames[0] == self.identity and frames[1] == b""
        message = proto.decode(frames[2:])
        self.log.append(message)
        return message

    def expect(self, command: Command, timeout_s: float = 5.0) -> proto.Message:
        """The next message from the consumer that is not a HEARTBEAT; it must be ``command``."""
        while True:
            message = self.receive(timeout_s)
            if message.command is not Command.HEARTBEAT:
                assert message.command is command, (message.command, message.header)
                return message

    def send(self, command: Command, header: dict[str, Any] | None = None,
             payloads: list[bytes] | None = None, *, seq: int | None = None,
             session: str | None = None) -> None:
        """A message of the current session, numbered next (or as the test says)."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        body = {**(header or {}), "session": self.session if session is None else session,
                "seq": seq}
        self.sock.send_multipart([self.identity, b"", *proto.encode(command, body,
                                                                   payloads or [])])

    def welcome(self, heartbeat_ms: int = 100, liveness: int = 100) -> str:
        """Open a new session (liveness is generous unless a test is about silence)."""
        self.session, self.seq = uuid.uuid4().hex, 0
        header = {"partitions": 2, "heartbeat_ms": heartbeat_ms, "liveness": liveness,
                  "ready": True, "session": self.session, "ack_timeout_ms": 30_000}
        self.sock.send_multipart([self.identity, b"", *proto.encode(Command.WELCOME, header)])
        return self.session

    def register(self, **timing: int) -> str:
        """HELLO in, WELCOME out, FETCH in: a session the consumer is in."""
        self.expect(Command.HELLO)
        session = self.welcome(**timing)
        fetch = self.expect(Command.FETCH)
        assert fetch.header["session"] == session
        return session

    def records(self, *batches: tuple[int, int, list[str]], first: int = 0,
                producer: Any = "8080") -> None:
        """One RECORDS message; each batch is (partition, epoch, ids) from offset ``first``."""
        entries, payloads = [], []
        for partition, epoch, ids in batches:
            blobs = [b'{"id": "%s"}' % i.encode() for i in ids]
            entries.append({"partition": partition, "epoch": epoch,
                            "offsets": [[first, len(ids)]], "ids": ids, "keys": None,
                            "producers": producer, "created_us": 1_700_000_000_000_000,
                            "attempts": 1, "sizes": [len(b) for b in blobs]})
            payloads.extend(blobs)
        self.send(Command.RECORDS, {"batches": entries}, proto.join_payloads(payloads))


def acked(message: proto.Message) -> dict[tuple[int, int], list[int]]:
    """An ACK as {(partition, epoch): offsets}."""
    assert message.command is Command.ACK
    return {(a["partition"], a["epoch"]): proto.from_runs(a["offsets"])
            for a in message.header["acks"]}


class GatedSink(Sink):
    """A real SQLite sink whose first transaction waits for ``gate``; it tells when it started
    and remembers every batch it was asked to store."""

    def __init__(self, url: str, gate: threading.Event, started: threading.Event) -> None:
        super().__init__(make_engine(url), "9090")
        self.gate, self.started = gate, started
        self.asked: list[tuple[int, int, list[int]]] = []

    def store(self, batches):  # type: ignore[no-untyped-def]
        self.asked.extend((b.partition, b.epoch, list(b.offsets)) for b in batches)
        self.started.set()
        if not self.gate.wait(10):
            raise SinkUnavailable("gate never opened (test)")
        return super().store(batches)


@pytest.fixture
def broker(ctx, endpoint):
    scripted = ScriptedBroker(ctx, endpoint("backend"))
    yield scripted
    scripted.close()


@pytest.fixture
def start_consumer(ctx, broker, db_url):
    """``start_consumer(**config)``: consumer 9090 connected to the scripted broker."""
    started: list[Consumer] = []

    def start(sink: Sink | None = None, **options: Any) -> Consumer:
        options.setdefault("tick_ms", 10)
        config = ConsumerConfig(name="9090", broker=broker.endpoint, db_url=db_url, **options)
        consumer = Consumer(config, context=ctx,
                            sink_factory=None if sink is None else (lambda: sink))
        consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        consumer.stop()


def test_the_consumer_times_the_broker_by_its_welcome_not_by_its_own_settings(
        broker, start_consumer):
    """Case 2: given a consumer configured with 100 ms heartbeats and a broker that WELCOMEs
    it with 1000 ms x 3, when the broker heartbeats at 1000 ms for 1.5 s, then the consumer
    never says HELLO again, and heartbeats at the broker's pace."""
    consumer = start_consumer(heartbeat_ms=100, liveness=3)
    session = broker.register(heartbeat_ms=1000, liveness=3)
    wait_until(lambda: consumer.registered, 5, "registration")
    assert (consumer.heartbeat_ms, consumer.liveness) == (1000, 3)
    snap = consumer.snapshot()
    assert (snap["heartbeat_ms"], snap["liveness"]) == (1000, 3)
    assert snap["session"] == session[:8]

    begin = time.monotonic()
    deadline, next_beat = begin + 1.5, begin + 1.0
    while (now := time.monotonic()) < deadline:
        if now >= next_beat:
            broker.send(Command.HEARTBEAT)
            next_beat = deadline + 1
        wait = min(deadline, next_beat) - now
        if broker.sock.poll(max(1, int(wait * 1000))):
            broker.receive()
    commands = [m.command for m in broker.log]
    assert Command.HELLO not in commands[1:], commands
    assert commands.count(Command.HEARTBEAT) <= 2  # 1000 ms apart, not 100
    assert consumer.stats["resets"] == 0 and consumer.stats["registrations"] == 1


def test_every_message_to_the_broker_names_the_session_and_counts(broker, start_consumer,
                                                                   db_url):
    consumer = start_consumer()
    hello = broker.expect(Command.HELLO)
    assert "previous" not in hello.header and "session" not in hello.header  # a fresh start
    session = broker.welcome()
    fetch = broker.expect(Command.FETCH)
    assert {k: fetch.header[k] for k in ("session", "seq", "seen")} == {
        "session": session, "seq": 1, "seen": 0}
    broker.send(Command.ASSIGN, {"partitions": [0]})  # seq 1
    broker.records((0, 1, ["a", "b", "c"]))  # seq 2
    ack = broker.expect(Command.ACK)
    assert (ack.header["session"], ack.header["seq"], ack.header["seen"]) == (session, 2, 2)
    assert acked(ack) == {(0, 1): [0, 1, 2]}
    beat = broker.receive()
    assert beat.command is Command.HEARTBEAT
    assert (beat.header["session"], beat.header["seq"], beat.header["seen"]) == (session, 3, 2)
    assert sorted(r["id"] for r in stored_rows(db_url)) == ["a", "b", "c"]
    assert consumer.assigned == [0]


def test_a_gap_in_the_brokers_numbering_resets_the_session_with_hello_previous(
        broker, start_consumer):
    """Case 1: a message lost on the wire (here: seq 2 never sent) is noticed by the next one;
    the consumer leaves the session with HELLO ``previous``, so the broker releases what it
    delivered without counting it against the records."""
    consumer = start_consumer()
    first = broker.register()
    broker.send(Command.ASSIGN, {"partitions": [0, 1]})  # seq 1
    broker.send(Command.HEARTBEAT, seq=3)
    hello = broker.expect(Command.HELLO)
    assert hello.header["previous"] == first
    assert consumer.assigned == [] and not consumer.registered  # it forgot what it held
    second = broker.welcome()
    fetch = broker.expect(Command.FETCH)
    assert (fetch.header["session"], fetch.header["seq"], fetch.header["seen"]) == (second, 1, 0)
    assert consumer.stats["resets"] == 1
    assert consumer.snapshot()["resets"] == 1


def test_a_silent_broker_is_given_up_after_its_own_heartbeat_times_liveness(
        broker, start_consumer):
    consumer = start_consumer(heartbeat_ms=10_000, liveness=10)  # on its own: 100 s
    first = broker.register(heartbeat_ms=50, liveness=4)  # the broker says: 200 ms
    hello = broker.expect(Command.HELLO, timeout_s=5)
    assert hello.header["previous"] == first
    assert consumer.stats["resets"] == 1


def test_an_err_not_registered_about_an_older_session_is_ignored(broker, start_consumer):
    consumer = start_consumer()
    old = broker.register()
    broker.send(Command.HEARTBEAT, seq=2)  # a gap: the consumer leaves ``old``
    assert broker.expect(Command.HELLO).header["previous"] == old
    current = broker.welcome()
    broker.expect(Command.FETCH)
    stale = consumer.stats["stale_messages"]
    # the broker's answer to something the consumer sent in the old session arrives late
    broker.send(Command.ERR, {"code": "NOT_REGISTERED", "reason": "unknown session",
                              "retryable": True}, session=old, seq=7)
    wait_until(lambda: consumer.stats["stale_messages"] > stale, 5, "the old ERR read")
    broker.send(Command.HEARTBEAT)  # seq 1 of the current session
    beat = _next_heartbeat_seeing(broker, 1)
    assert beat.header["session"] == current
    assert consumer.registered and consumer.stats["resets"] == 1
    # an answer about the current session is acted on, numbered or not (the broker's answer
    # once it ended the session is outside the numbering)
    broker.send(Command.ERR, {"code": "NOT_REGISTERED", "reason": "session ended",
                              "retryable": True})
    assert broker.expect(Command.HELLO).header["previous"] == current
    third = broker.welcome()
    broker.expect(Command.FETCH)
    unnumbered = {"code": "NOT_REGISTERED", "reason": "session reset", "retryable": True,
                  "session": third}
    broker.sock.send_multipart([broker.identity, b"", *proto.encode(Command.ERR, unnumbered)])
    assert broker.expect(Command.HELLO).header["previous"] == third
    assert consumer.stats["resets"] == 3


def _next_heartbeat_seeing(broker: ScriptedBroker, seen: int) -> proto.Message:
    """The consumer's next HEARTBEAT that reports broker seq ``seen``; nothing but
    heartbeats may come before it."""
    while True:
        message = broker.receive()
        assert message.command is Command.HEARTBEAT, message.command
        if message.header["seen"] == seen:
            return message


def test_records_of_an_ended_session_are_never_acknowledged_in_the_next(
        broker, start_consumer, db_url):
    """Given a batch being stored and one queued behind it when the session resets, then the
    stored one is not acknowledged under the new session and the queued one is dropped
    unstored; the new session's deliveries of the same records are what get acknowledged."""
    gate, started = threading.Event(), threading.Event()
    sink = GatedSink(db_url, gate, started)
    consumer = start_consumer(sink=sink)
    try:
        old = broker.register()
        broker.records((0, 1, ["a", "b"]))  # seq 1: the worker starts on it
        assert started.wait(5)
        broker.records((1, 1, ["c"]))  # seq 2: queued behind it
        wait_until(lambda: consumer.stats["received"] == 3, 5, "both batches received")
        broker.send(Command.HEARTBEAT, seq=4)  # a gap
        assert broker.expect(Command.HELLO).header["previous"] == old
        new = broker.welcome()
        broker.expect(Command.FETCH)
        gate.set()
        wait_until(lambda: consumer.outstanding == 0, 5, "the old batches finished")
        assert consumer.stats["dropped"] == 1
        assert (1, 1, [0]) not in sink.asked  # never stored: its session had ended
        broker.records((0, 2, ["a", "b"]), (1, 2, ["c"]))  # the new session's deliveries
        ack = broker.expect(Command.ACK)
        assert ack.header["session"] == new
        assert acked(ack) == {(0, 2): [0, 1], (1, 2): [0]}
        assert all(m.header.get("session") != old for m in broker.log
                   if m.command is Command.ACK)
        assert sorted(r["id"] for r in stored_rows(db_url)) == ["a", "b", "c"]
    finally:
        gate.set()


def test_ack_timeout_drops_unstarted_batches_of_the_old_epoch(broker, start_consumer,
                                                               db_url):
    """Given partition 0 fenced by ACK_TIMEOUT (epoch 1 -> 2) while one of its batches is being
    stored and another waits, then the waiting one is dropped unstored, the other partition's
    batch is stored and acknowledged, the late ACK of epoch 1 goes out and its refusal
    (STALE_EPOCH) changes nothing; the redelivery at epoch 2 is stored and acknowledged."""
    gate, started = threading.Event(), threading.Event()
    sink = GatedSink(db_url, gate, started)
    consumer = start_consumer(sink=sink)
    try:
        session = broker.register()
        broker.records((0, 1, ["a", "b"]))  # seq 1: being stored
        assert started.wait(5)
        broker.records((0, 1, ["c", "d"]), (1, 1, ["e"]), first=2)  # seq 2: waiting
        broker.send(Command.ERR, {"code": "ACK_TIMEOUT", "partition": 0, "epoch": 2,
                                  "reason": "in flight too long", "retryable": False})
        wait_until(lambda: consumer.stats["ack_timeouts"] == 1, 5, "ACK_TIMEOUT read")
        gate.set()
        offsets: dict[tuple[int, int], list[int]] = {}
        while len(offsets) < 2:
            offsets.update(acked(broker.expect(Command.ACK)))
        assert offsets == {(0, 1): [0, 1], (1, 1): [2]}
        assert [(p, e) for p, e, _ in sink.asked] == [(0, 1), (1, 1)]  # (0, 1) [2, 3] dropped
        broker.send(Command.ERR, {"code": "STALE_EPOCH", "reason": "epoch 2", "partition": 0,
                                  "retryable": False})
        wait_until(lambda: consumer.stats["refused_acks"] == 1, 5, "the refusal read")
        assert consumer.registered and consumer.session == session
        broker.records((0, 2, ["a", "b", "c", "d"]))
        assert acked(broker.expect(Command.ACK)) == {(0, 2): [0, 1, 2, 3]}
        assert sorted(r["id"] for r in stored_rows(db_url)) == ["a", "b", "c", "d", "e"]
    finally:
        gate.set()


def test_a_record_stored_nowhere_is_reported_left_unacknowledged_and_the_rest_flows(
        broker, start_consumer, db_url, caplog):
    """Case 3: given a record that neither ``records`` nor ``dead_letters`` takes (no
    producer: NOT NULL in both), then the consumer does not retry it for ever: it says so
    (STATS, ``sink_error``, an ERROR line), never acknowledges it, and goes on storing and
    acknowledging every other record, of its partition and of the others."""
    caplog.set_level(logging.ERROR)
    consumer = start_consumer(max_attempts=1, retry_initial_s=0.01)
    broker.register()
    broker.records((0, 1, ["a0", "a1", "a2"]), producer=["8080", None, "8080"])
    broker.records((1, 1, ["b0", "b1"]))
    offsets: dict[tuple[int, int], list[int]] = {}
    while len(offsets) < 2:
        offsets.update(acked(broker.expect(Command.ACK)))
    assert offsets == {(0, 1): [0, 2], (1, 1): [0, 1]}
    snap = consumer.snapshot()
    assert "a1" in snap["sink_error"] and "left unacknowledged" in snap["sink_error"]
    assert [(s["partition"], s["offset"], s["id"]) for s in snap["stuck_records"]] == [
        (0, 1, "a1")]
    assert snap["stuck"] == 1 and snap["last_sink_error"] == snap["sink_error"]
    assert any("a1" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    broker.records((1, 1, ["b2"]), first=2)  # the consumer goes on
    assert acked(broker.expect(Command.ACK)) == {(1, 1): [2]}
    assert sorted(r["id"] for r in stored_rows(db_url)) == ["a0", "a2", "b0", "b1", "b2"]
    assert all(1 not in offs for (p, _), offs in offsets.items() if p == 0)


def test_batches_stored_together_are_acknowledged_with_one_entry_per_partition(
        broker, start_consumer, db_url):
    """The broker refuses an ACK with more entries than it has partitions: batches of one
    partition that finish in one transaction are acknowledged as one entry."""
    gate, started = threading.Event(), threading.Event()
    consumer = start_consumer(sink=GatedSink(db_url, gate, started))
    try:
        broker.register()
        broker.records((0, 1, ["a"]))  # the worker starts on it; the rest piles up
        assert started.wait(5)
        for n, record_id in enumerate(["b", "c", "d"], start=1):
            broker.records((0, 1, [record_id]), (1, 1, [f"x{n}"]), first=n)
        wait_until(lambda: consumer.stats["received"] == 7, 5, "all received")
        gate.set()
        messages: list[list[tuple[int, list[int]]]] = []
        done: dict[int, list[int]] = {0: [], 1: []}
        while done != {0: [0, 1, 2, 3], 1: [1, 2, 3]}:
            acks = broker.expect(Command.ACK).header["acks"]
            messages.append([(a["partition"], proto.from_runs(a["offsets"])) for a in acks])
            for partition, offsets in messages[-1]:
                done[partition] = sorted(done[partition] + offsets)
        for entries in messages:  # one entry per partition in each message
            assert len({p for p, _ in entries}) == len(entries), messages
        # "a" was stored alone; "b", "c", "d" together: one entry, not three
        assert (0, [1, 2, 3]) in messages[-1] or (0, [0, 1, 2, 3]) in messages[-1], messages
    finally:
        gate.set()
