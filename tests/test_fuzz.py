"""Fuzzing: every decoder, and every socket a stranger can reach, fed random and mutated
messages ("Nobody gets in uninvited": no message kills a node).

Properties:
- a decoder decodes or raises what it documents (``ProtocolError``; ``ValueError`` for
  ``parse_json``), never anything else, and whatever it lets through nests at most
  ``MAX_HEADER_DEPTH`` deep;
- a node answers or ignores every message, never with ``INTERNAL`` (an unexpected exception),
  stays up, answers STATS afterwards, and grows by a bounded amount; then records still flow.

Every test is ``derandomize=True`` (examples drawn from a hash of the test, no example
database): the same messages on every run, so a CI failure reproduces locally. The storms on
live nodes do not shrink (the node keeps its state between examples, so a smaller example
would not fail the same way); the socket-free broker storm does, down to the message that
fails.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import zmq
from helpers import (
    Clock,
    batch_rows,
    consumer_says,
    depth_of,
    hello,
    recv,
    stored_rows,
    to,
    wait_until,
)
from helpers import put as put_records
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from zmqlab import protocol as proto
from zmqlab.broker import Broker, Side
from zmqlab.config import BrokerConfig, ConsumerConfig, ProducerConfig
from zmqlab.consumer import Consumer
from zmqlab.dedupe import DedupeWindow
from zmqlab.errors import ProtocolError
from zmqlab.intake import Intake
from zmqlab.partition import Partition
from zmqlab.producer import Producer, ProducerService, encode_put, fitting_puts, make_record
from zmqlab.protocol import MAX_HEADER_BYTES, MAX_HEADER_DEPTH, Command

# -- settings ------------------------------------------------------------------------------------
DECODERS = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
# Live nodes keep their state from one example to the next: generate, never shrink.
LIVE = settings(deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPLY_TIMEOUT_S = 10.0  # every receive is bounded; nothing here should take a tenth of it


# -- strategies: JSON, headers, frames ------------------------------------------------------------
NAMES = ["9090", "9091", "①", "²", "³9090", "፩", "8080", "", "a" * 256, "x\x00y", "\ud7ff"]
BIG_INTS = [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -1, 0]
LEAVES = (st.none() | st.booleans() | st.integers(-3, 20) | st.sampled_from(BIG_INTS)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
          | st.sampled_from(NAMES))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
RUNS = st.sampled_from([[[0, 20_000_000]], [[0, 2**64]], [[-1, 1]], [[0, 0]], [[0, -5]],
                        [[0, 1, 2]], [["0", 1]], [[0, True]], [[2**63, 1]], [], [[0, 1]] * 500,
                        [[i, 1] for i in range(0, 400, 2)], [[0, 1], [0, 1]], [[1.5, 1]]])
# Values to put where a field goes, drawn as one choice (a storm draws thousands of messages:
# a recursive strategy per field would cost milliseconds each).
POOL: list[Any] = [
    None, True, False, 0, 1, -1, 1.5, -0.0, 1e308, *BIG_INTS, "", "a", *NAMES, "x" * 129,
    "x" * 1025, [], {}, [1], ["a"], [None], [[0, 1]], [[0, 20_000_000]], {"a": 1},
    {"partition": 0, "epoch": 1, "offsets": [[0, 1]]}, [{}], [[]], [[[[[[[[[[1]]]]]]]]]],
    {"a": {"b": {"c": {"d": {"e": {}}}}}}, [0] * 1000, ["x"] * 1000, [{"a": [1, {"b": None}]}],
    {"": {"": []}}, [[0, 1]] * 7, [1, "a", None, [], {}],
]
VALUES = st.sampled_from(POOL)
# JSON no encoder makes: what only a hand-made frame carries.
RAW = st.sampled_from([b"NaN", b"Infinity", b'"\\ud800"', b'"\xff\xfe"', b"1" + b"0" * 5000,
                       b"1e999", b"-", b'"', b"[" * 40, b"01", b'"\x01"', b"{}}", b"nul"])
DEPTHS = st.sampled_from([MAX_HEADER_DEPTH - 1, MAX_HEADER_DEPTH, MAX_HEADER_DEPTH + 1, 100,
                          999, 1000, 1001, 5000, 100_000])


def deep(depth: int, opener: bytes, closed: bool) -> bytes:
    """A JSON value nested ``depth`` deep (or its opening half only)."""
    close = b"]" if opener == b"[" else b"}"
    return opener * depth + (close * depth if closed and opener == b"[" else
                             b"1" + close * depth if closed else b"")


DEEP = st.builds(deep, DEPTHS, st.sampled_from([b"[", b'{"a":']), st.booleans())
_PLACEHOLDER = "\x07placeholder\x07"


def oversize() -> bytes:
    """A well-formed header one byte over the bound (16 MiB: made when needed, not kept)."""
    return b'{"pad":"' + b"x" * (MAX_HEADER_BYTES - len(b'{"pad":""}') + 1) + b'"}'


# A mutation is data (so hypothesis can draw and print it); ``mutate`` applies it to a header.
# One in three keeps the header right, so that sessions live long enough to hold records.
KEEP = st.just(("keep",))
FIELDS = ["credit", "acks", "ids", "keys", "sizes", "created_us", "role", "name", "session",
          "seq", "seen", "previous", "offsets", "epoch", "partition", "dead"]


def mutations(values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        KEEP, KEEP, KEEP, KEEP, KEEP,
        st.tuples(st.just("set"), st.sampled_from(FIELDS) | st.text(max_size=4), values | RUNS),
        st.tuples(st.just("entry"), st.sampled_from(["partition", "epoch", "offsets", "dead"]),
                  values | RUNS),
        st.tuples(st.just("raw"), st.sampled_from(FIELDS), RAW | DEEP),
        st.tuples(st.just("drop"), st.sampled_from(FIELDS)),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                            min_size=1, max_size=4)),
        st.tuples(st.just("bytes"), st.binary(max_size=64)),
        st.tuples(st.just("value"), values),
        st.tuples(st.just("deep"), DEEP),
        st.just(("empty",)),
    )


MUTATIONS = mutations(VALUES)


def mutate(header: dict[str, Any], mutation: tuple[Any, ...]) -> bytes:
    """The header frame ``header`` becomes under ``mutation``."""
    kind, *args = mutation
    header = dict(header)
    if kind == "set":
        header[args[0]] = args[1]
    elif kind == "entry" and isinstance(header.get("acks"), list) and header["acks"] \
            and isinstance(header["acks"][0], dict):
        header["acks"] = [{**header["acks"][0], args[0]: args[1]}, *header["acks"][1:]]
    elif kind == "raw":
        header[args[0]] = _PLACEHOLDER
        return proto.dump(header).replace(proto.dump(_PLACEHOLDER), args[1])
    elif kind == "drop":
        header.pop(args[0], None)
    encoded = proto.dump(header)
    if kind == "truncate":
        return encoded[:int(len(encoded) * args[0])]
    if kind == "flip":
        data = bytearray(encoded)
        for where, byte in args[0]:
            data[min(int(where * len(data)), len(data) - 1)] = byte
        return bytes(data)
    if kind == "bytes":
        return bytes(args[0])
    if kind == "value":
        return proto.dump(args[0])
    if kind == "deep":
        return b'{"a":' + args[0] + b"}"
    if kind == "empty":
        return b""
    return encoded


# The frames around a header: right, or wrong in one way.
FRAMINGS = st.one_of(
    st.just(("ok",)), st.just(("ok",)), st.just(("ok",)),
    st.tuples(st.just("version"), st.sampled_from([b"ZQL3", b"", b"zql4", b"ZQL4\x00",
                                                   b"\xff" * 40])),
    st.tuples(st.just("command"), st.sampled_from([b"", b"NOPE", b"hello", b"ERR", b"WELCOME",
                                                   b"RECORDS", b"ASSIGN", b"\x00" * 64])),
    st.tuples(st.just("cut"), st.integers(0, 2)),
    st.tuples(st.just("extra"), st.lists(st.binary(max_size=16), min_size=1, max_size=3)),
)
# 16 MiB a frame: drawn rarely (a live storm would copy gigabytes), and sent once on purpose.
FRAMINGS_WITH_OVERSIZE = st.one_of(FRAMINGS, st.just(("oversize",)))


def frame(command: Command, header: bytes, payloads: list[bytes],
          framing: tuple[Any, ...]) -> list[bytes]:
    kind, *args = framing
    frames = [proto.VERSION, command.value, header, *payloads]
    if kind == "version":
        frames[0] = args[0]
    elif kind == "command":
        frames[1] = args[0]
    elif kind == "cut":
        frames = frames[:args[0]]
    elif kind == "extra":
        frames += args[0]
    elif kind == "oversize":
        frames[2] = oversize()
    return frames


PAYLOADS = st.sampled_from([b"{}", b'{"n":1}', b'{"n":"\xe2\x91\xa0"}', b"[]", b"{", b"",
                            b"null", b'{"a":NaN}', b'{"a":"\\ud800"}', b'{"a":"\xff"}',
                            b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                            b'{"a":' + b"1" * 5000 + b"}", b'{"a":1}x'])
IDS = st.sampled_from(["a", "b", "9090", "①", "x" * 128, "x" * 129, "", "a\x00", "\ud7ff", *POOL])
KEYS = st.sampled_from([None, "k", "①", "x" * 1024, "x" * 1025, "a\x00", 7, []])
CREATED = st.sampled_from([1_000_000, -1, 2**63, 253_402_214_400_000_001, "now"])
SIZES = st.lists(st.integers(-2, 10**7), max_size=8)
# (Strategies are built once, here: building one per draw costs more than drawing from it.)


@st.composite
def put_parts(draw: st.DrawFn, values: st.SearchStrategy[Any]
              ) -> list[tuple[dict[str, Any], bytes]]:
    """The (header, payload frame) parts of a PUT, mostly right, sometimes not."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        payloads = draw(st.lists(PAYLOADS, max_size=6))
        count = len(payloads) if draw(st.booleans()) else draw(st.integers(0, 8))
        ids = [str(uuid.UUID(int=draw(st.integers(0, 2**16)))) if draw(st.booleans())
               else draw(IDS) for _ in range(count)]
        keys = [draw(KEYS) for _ in range(count)] if draw(st.booleans()) else \
            draw(KEYS if draw(st.booleans()) else values)
        sizes = [len(p) for p in payloads] if draw(st.booleans()) else \
            draw(SIZES if draw(st.booleans()) else values)
        created = draw(CREATED if draw(st.booleans()) else values)
        parts.append(({"ids": ids, "keys": keys, "created_us": created, "sizes": sizes},
                      b"".join(payloads)))
    return parts


COMMANDS = st.sampled_from([Command.HELLO, Command.PUT, Command.PUT, Command.HEARTBEAT,
                            Command.BYE, Command.STATS, Command.FETCH, Command.ACK])


@st.composite
def frontend_messages(draw: st.DrawFn, values: st.SearchStrategy[Any] = VALUES,
                      changes: st.SearchStrategy[tuple[Any, ...]] = MUTATIONS) -> list[bytes]:
    """One message a producer or status client might send, after the envelope."""
    command = draw(COMMANDS)
    mutation = draw(changes)
    framing = draw(FRAMINGS)
    if command is Command.PUT:
        first, *rest = draw(put_parts(values))
        payloads = [first[1]]
        for header, blob in rest:
            payloads += [mutate(header, draw(changes)), blob]
        return frame(command, mutate(first[0], mutation), payloads, framing)
    header: dict[str, Any] = {"role": "producer", "name": draw(st.sampled_from(NAMES))} \
        if command is Command.HELLO else {}
    return frame(command, mutate(header, mutation), [], framing)


@dataclass
class BackendStep:
    """One message a consumer might send: its header is made when it is sent, from what the
    peer knows of its session then (``stamp``: with its session, seq and seen)."""

    peer: int
    command: Command
    stamp: bool
    mutation: tuple[Any, ...]
    framing: tuple[Any, ...]
    credit: int
    entry: tuple[Any, ...]  # what an ACK does to the entry of a batch it holds

    def frames(self, peer: Peer) -> list[bytes]:
        """The message, made now; an ACK whose entry is wrong is otherwise right (and in the
        session), so that it reaches the partition it names."""
        if self.command is Command.ACK and self.entry[0] != "keep":
            return proto.encode(Command.ACK, peer.header(self))
        return frame(self.command, mutate(peer.header(self), self.mutation), [], self.framing)


ENTRIES = st.one_of(
    KEEP, KEEP,
    st.tuples(st.just("entry"), st.sampled_from(["partition", "epoch", "offsets", "dead"]),
              RUNS | VALUES),
    st.tuples(st.just("entry"), st.just("offsets"), RUNS),
    st.tuples(st.just("shift"), st.sampled_from([-1, 1, 2**63])),  # epoch or first offset off
    st.tuples(st.just("repeat"), st.integers(2, 8)),  # the same partition, or too many
)
BACKEND_STEPS = st.builds(
    BackendStep, st.integers(0, 2) | st.integers(0, 100),  # mostly the three owners
    st.sampled_from([Command.HELLO, Command.FETCH, Command.ACK, Command.ACK, Command.ACK,
                     Command.HEARTBEAT, Command.BYE, Command.PUT, Command.STATS]),
    st.booleans() | st.just(True), MUTATIONS, FRAMINGS,
    st.sampled_from([0, 1, 5, 100, 10**6, -1]), ENTRIES)


def ack_entry(held: dict[str, Any], change: tuple[Any, ...]) -> list[dict[str, Any]]:
    entry = {k: held[k] for k in ("partition", "epoch", "offsets")}
    kind, *args = change
    if kind == "entry":
        entry[args[0]] = args[1]
    elif kind == "shift":
        entry["epoch"] += args[0]
        entry["offsets"] = [[entry["offsets"][0][0] + args[0], entry["offsets"][0][1]]]
    elif kind == "repeat":
        return [entry] * args[0]
    return [entry]


# -- a consumer's session, as a storm peer knows it ----------------------------------------------
@dataclass
class Peer:
    identity: bytes
    session: str | None = None
    seq: int = 0
    seen: int = 0
    held: list[dict[str, Any]] = field(default_factory=list)  # RECORDS batches not acked

    def header(self, step: BackendStep) -> dict[str, Any]:
        if step.command is Command.HELLO:
            header: dict[str, Any] = {"role": "consumer"}
            if self.session is not None and step.credit > 0:
                header["previous"] = self.session
        elif step.command is Command.FETCH:
            header = {"credit": step.credit}
        elif step.command is Command.ACK:
            held = self.held[step.credit % len(self.held)] if self.held else \
                {"partition": 0, "epoch": 1, "offsets": [[0, 1]]}
            header = {"acks": ack_entry(held, step.entry)}
        else:
            header = {}
        if step.stamp and self.session is not None and step.command is not Command.HELLO:
            self.seq += 1
            header.update(session=self.session, seq=self.seq, seen=self.seen)
        return header

    def heard(self, message: proto.Message) -> None:
        """What a consumer learns from a message of the broker (as ``helpers.to`` does)."""
        header = message.header
        if message.command is Command.WELCOME and isinstance(header.get("session"), str):
            self.session, self.seq, self.seen, self.held = header["session"], 0, 0, []
        elif self.session is not None and header.get("session") == self.session:
            if header.get("seq") == self.seen + 1:
                self.seen += 1
                if message.command is Command.RECORDS:  # the latest few are enough to ACK
                    self.held = [*self.held, *header["batches"]][-16:]
            if message.command is Command.ERR and header.get("code") == "NOT_REGISTERED":
                self.session = None


IDENTITIES = [b"9090", b"9091", "①".encode(), "²".encode(), "³9090".encode(), "፩".encode(),
              b"\xff\xfe", b"x" * 255, b"a\x00b"]
# ZeroMQ reserves identities that start with a zero byte; one already in use would be taken
# over (ROUTER_HANDOVER), and its peer would hear nothing more.
STRANGERS = st.binary(min_size=1, max_size=255).filter(
    lambda b: b[0] != 0 and b not in IDENTITIES)


def internal(message: proto.Message) -> bool:
    return message.command is Command.ERR and message.header.get("code") == "INTERNAL"


# -- 1. every decoder ----------------------------------------------------------------------------
ANY_JSON = JSON | VALUES
JSON_MUTATIONS = mutations(ANY_JSON)
HEADERS = st.builds(mutate, st.fixed_dictionaries({"credit": JSON, "acks": JSON}) | st.just({}),
                    JSON_MUTATIONS)
FRAMES = (st.lists(st.binary(max_size=40), max_size=6)
          | st.builds(frame, st.sampled_from(list(Command)), HEADERS,
                      st.lists(st.binary(max_size=20), max_size=3), FRAMINGS_WITH_OVERSIZE)
          | frontend_messages(ANY_JSON, JSON_MUTATIONS))


@DECODERS
@given(FRAMES)
def test_decode_decodes_or_refuses(frames):
    try:
        message = proto.decode(frames)
    except ProtocolError:
        return
    assert isinstance(message.header, dict)
    assert depth_of(message.header) <= MAX_HEADER_DEPTH


@DECODERS
@given(HEADERS | st.binary(max_size=200) | DEEP | RAW)
def test_parse_header_parses_or_refuses(header):
    try:
        parsed = proto.parse_header(header)
    except ProtocolError as exc:
        assert exc.code == "BAD_MESSAGE"
        return
    assert isinstance(parsed, dict) and depth_of(parsed) <= MAX_HEADER_DEPTH
    assert len(header) <= MAX_HEADER_BYTES


@DECODERS
@given(HEADERS | st.binary(max_size=200) | DEEP | RAW)
def test_parse_json_parses_or_raises_value_error(data):
    try:
        proto.parse_json(data)
    except ValueError:
        pass


@DECODERS
@given(st.lists(st.binary(max_size=8) | st.just(b""), max_size=8))
def test_split_envelope_splits_or_refuses(frames):
    try:
        route, body = proto.split_envelope(frames)
    except ProtocolError:
        assert b"" not in frames[1:proto.MAX_ROUTE + 1]
        return
    assert frames == [*route, b"", *body] and 1 <= len(route) <= proto.MAX_ROUTE


@DECODERS
@given(st.dictionaries(st.text(max_size=4), JSON, max_size=3),
       st.lists(st.binary(max_size=8), max_size=7))
def test_put_parts_pairs_or_refuses(header, payloads):
    message = proto.Message(Command.PUT, header, tuple(payloads))
    try:
        parts = proto.put_parts(message)
    except ProtocolError:
        return
    assert parts[0] == (header, payloads[0]) and len(parts) == (len(payloads) + 1) // 2


@DECODERS
@given(st.dictionaries(st.sampled_from(["ids", "keys", "x"]), JSON | RUNS, max_size=3),
       st.sampled_from(["ids", "keys"]), st.integers(0, 50), st.booleans())
def test_column_is_count_values_or_refused(header, name, count, optional):
    try:
        values = proto.column(header, name, count, optional=optional)
    except ProtocolError:
        return
    assert len(values) == count


@DECODERS
@given(st.lists(st.integers(-2, 50) | st.sampled_from(BIG_INTS) | JSON, max_size=10),
       st.lists(st.binary(max_size=60), max_size=2))
def test_split_payloads_cuts_or_refuses(sizes, frames):
    try:
        payloads = proto.split_payloads(sizes, frames)
    except ProtocolError:
        return
    assert len(payloads) == len(sizes) and b"".join(payloads) == b"".join(frames)


@DECODERS
@given(RUNS | JSON | st.lists(st.lists(st.integers(-(2**64), 2**64), max_size=3), max_size=5))
def test_from_runs_expands_or_refuses(runs):
    if not isinstance(runs, list):
        return  # callers pass lists (``require(…, list)``)
    try:
        offsets = proto.from_runs(runs)
    except ProtocolError:
        return
    assert len(offsets) <= proto.MAX_RUN_OFFSETS


@DECODERS
@given(st.lists(st.integers(-(2**64), 2**64), max_size=40))
def test_to_runs_of_any_offsets_and_back(offsets):
    runs = proto.to_runs(offsets)
    if offsets == sorted(set(offsets)):  # what it documents: ascending offsets
        assert proto.from_runs(runs) == offsets


@DECODERS
@given(st.lists(PAYLOADS | st.binary(max_size=30), max_size=8),
       st.none() | st.integers(0, 100))
def test_invalid_objects_finds_every_bad_payload_and_raises_nothing(payloads, max_bytes):
    def bad(payload: bytes) -> bool:
        if max_bytes is not None and len(payload) > max_bytes:
            return True
        try:
            msgspec.json.decode(payload, type=dict)
        except (msgspec.DecodeError, RecursionError):
            return True
        return False

    found = proto.invalid_objects(payloads, max_bytes)
    assert found == {i for i, p in enumerate(payloads) if bad(p)}


# -- 2. the broker, driven through its handlers (socket-free: shrinks to the failing message) -----
@dataclass
class Storm:
    """A broker on fake time, its consumers' sessions as the storm peers know them."""

    broker: Broker
    clock: Clock
    peers: list[Peer]
    sent: list[Any] = field(default_factory=list)  # what was sent, for the failure report

    def backend(self, step: BackendStep) -> None:
        peer = self.peers[step.peer % len(self.peers)]
        if step.stamp and peer.session is None and step.command is not Command.HELLO:
            self.register(peer)  # as a real consumer would, before anything else
        frames = step.frames(peer)
        self.sent.append((peer.identity, frames))
        self.broker.handle_backend([peer.identity, b"", *frames], self.clock.now)
        self.settle()

    def register(self, peer: Peer) -> None:
        """HELLO, and once WELCOME came, credit."""
        self.broker.handle_backend([peer.identity, b"", *proto.encode(
            Command.HELLO, {"role": "consumer"})], self.clock.now)
        self.settle()
        if peer.session is not None:
            peer.seq += 1
            self.broker.handle_backend([peer.identity, b"", *proto.encode(Command.FETCH, {
                "credit": 100, "session": peer.session, "seq": peer.seq, "seen": peer.seen})],
                self.clock.now)
            self.settle()

    def frontend(self, frames: list[bytes], who: bytes) -> None:
        self.sent.append((who, frames))
        self.broker.handle_frontend([who, b"", *frames], self.clock.now)
        self.settle()

    def settle(self) -> None:
        """What the loop does after a message (parked PUTs, delivery); then every message the
        broker sends is read, and none may be INTERNAL."""
        broker, now = self.broker, self.clock.now
        if broker.parking:
            broker.unpark(now)
        broker.deliver(now)
        outbox, broker.outbox = broker.outbox, []
        for side, frames in outbox:
            route, body = proto.split_envelope(frames)
            message = proto.decode(body)
            assert not internal(message), (message.header, self.sent[-1])
            if side is Side.BACKEND:
                for peer in self.peers:
                    if peer.identity == route[0]:
                        peer.heard(message)


def take_everything(broker: Broker, name: str, messages: list[proto.Message]) -> list[str]:
    """Consumer ``name`` acknowledges every batch it is sent until none comes: the ids."""
    delivered: list[str] = []
    while True:
        assert not [m for m in messages if m.command is Command.ERR], messages
        records = [m for m in messages if m.command is Command.RECORDS]
        if not records:
            return delivered
        messages = []
        for message in records:
            batches = message.header["batches"]
            delivered += [row[1] for b in batches for row in batch_rows(b)]
            messages += consumer_says(broker, name, Command.ACK, {"acks": [
                {"partition": b["partition"], "epoch": b["epoch"], "offsets": b["offsets"]}
                for b in batches]})


@settings(DECODERS, max_examples=120)
@given(st.lists(st.tuples(st.integers(0, 3), frontend_messages(), BACKEND_STEPS,
                          st.floats(0, 2)), min_size=10, max_size=40))
def test_the_broker_answers_every_message_of_a_storm_and_records_still_flow(steps):
    # Given a broker with a producer that said HELLO, and would-be consumers
    clock = Clock()
    # (rings of 8 records fill up, so PUTs wait for room, and are answered when it comes)
    broker = Broker(BrokerConfig(frontend="inproc://f", backend="inproc://b", partitions=3,
                                 capacity=8, heartbeat_ms=1000, liveness=3), clock=clock)
    storm = Storm(broker, clock, [Peer(i) for i in IDENTITIES])
    storm.frontend(proto.encode_hello_producer("8080"), b"storm-producer")
    # When producers, strangers and consumers send whatever they send, as time goes by
    for kind, message, step, wait_s in steps:
        if kind == 0:
            storm.frontend(message, b"storm-producer")
        elif kind == 1:
            storm.frontend(message, b"stranger")
        else:
            if kind == 3:  # records to hold and acknowledge, enough to fill the rings
                key = None if step.credit < 0 else f"k{step.credit % 4}"
                storm.frontend(encode_put([make_record({"n": n}, key=key) for n in range(6)]),
                               b"storm-producer")
            storm.backend(step)
        clock.now += wait_s
        broker.tick(clock.now)
        storm.settle()
    # Then every message was answered without INTERNAL (``settle`` checks), and once the
    # storm's consumers are gone a new consumer gets a new producer's records, each once
    clock.now += 10
    broker.tick(clock.now)
    storm.settle()
    messages = consumer_says(broker, "7777", Command.HELLO)
    messages += consumer_says(broker, "7777", Command.FETCH, {"credit": 10_000})
    take_everything(broker, "7777", messages)  # what the storm left: room for what comes
    hello(broker, b"fresh", "8089")
    ids = [f"fresh-{n}" for n in range(20)]
    reply = put_records(broker, *[b'{"n":%d}' % n for n in range(20)], ids=ids, who=b"fresh")
    assert reply.command is Command.ACK and not reply.header["errors"], reply.header
    delivered = take_everything(broker, "7777", to(broker, "7777"))
    assert sorted(delivered) == sorted(ids)


# -- 3. live nodes --------------------------------------------------------------------------------
def vm_rss_bytes() -> int:
    """This process's resident set (the nodes run as threads in it), once garbage is
    collected and the C allocator has handed back what it keeps of freed memory (it keeps
    tens of MiB after a storm of 16 MiB frames, which says nothing of what is in use)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the bound below is generous anyway
        pass
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextmanager
def sockets(ctx: zmq.Context[Any]) -> Iterator[Callable[..., zmq.Socket[Any]]]:
    """``open(kind, endpoint, identity=None)`` connects a socket; all are closed on the way
    out, whatever happened."""
    opened: list[zmq.Socket[Any]] = []

    def open_socket(kind: int, endpoint: str, identity: bytes | None = None) -> zmq.Socket[Any]:
        sock = ctx.socket(kind)
        opened.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(endpoint)
        return sock

    try:
        yield open_socket
    finally:
        for sock in opened:
            sock.close(0)


def no_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    internal_logged = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert not internal_logged, internal_logged


class Requests:
    """A DEALER that tags each request (the route echoes it), so replies are matched to
    requests however many are in flight and in whatever order they come. Only what is
    still unanswered is kept (a storm sends thousands)."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.sent = 0
        self.pending: dict[int, list[bytes]] = {}
        self.wanted: dict[int, proto.Message | None] = {}

    def send(self, frames: list[bytes]) -> int:
        tag = self.sent
        self.sent += 1
        self.pending[tag] = frames
        self.sock.send_multipart([b"%d" % tag, b"", *frames])
        return tag

    def read(self, timeout_s: float) -> None:
        """Read one reply (or fail after ``timeout_s``): none may be INTERNAL."""
        frames = recv(self.sock, timeout_s)
        tag = int(frames[0])
        message = proto.decode(frames[2:])
        assert not internal(message), (message.header, [f[:200] for f in self.pending[tag]])
        del self.pending[tag]
        if tag in self.wanted:
            self.wanted[tag] = message

    def wait(self, tag: int, timeout_s: float = REPLY_TIMEOUT_S) -> proto.Message:
        self.wanted.setdefault(tag, None)
        while (answer := self.wanted[tag]) is None:
            self.read(timeout_s)
        del self.wanted[tag]
        return answer

    def wait_all(self, timeout_s: float = REPLY_TIMEOUT_S) -> None:
        while self.pending:
            self.read(timeout_s)


def storm_through(requests: Requests, storm_settings: settings) -> None:
    """Send a header over the size bound and one nested 100,000 deep, each refused
    BAD_MESSAGE unparsed; then the requests hypothesis draws, and wait for every answer, an
    example at a time."""
    for header in (oversize(), deep(100_000, b"[", True)):
        answer = requests.wait(requests.send(frame(Command.HELLO, header, [], ("ok",))))
        assert proto.error_of(answer)[0] == "BAD_MESSAGE", answer.header

    @storm_settings
    @given(st.lists(frontend_messages(), min_size=30, max_size=60))
    def storm(messages: list[list[bytes]]) -> None:
        for message in messages:
            requests.send(message)
        requests.wait_all()

    storm()


def test_the_live_broker_survives_a_storm_on_both_sockets_then_stores_every_record_once(
        ctx, tmp_path, caplog):
    # Given a live broker, a storm producer, a stranger and nine would-be consumers
    config = BrokerConfig(frontend="inproc://fuzz-front", backend="inproc://fuzz-back",
                          partitions=3, capacity=2000, heartbeat_ms=200)
    broker = Broker(config, context=ctx)
    broker.start()
    try:
        with sockets(ctx) as connect:
            producer = Requests(connect(zmq.DEALER, config.frontend, b"storm-producer"))
            stranger = Requests(connect(zmq.DEALER, config.frontend, b"stranger"))
            peers = [Peer(i) for i in IDENTITIES]
            dealers = [connect(zmq.DEALER, config.backend, p.identity) for p in peers]
            rss_before = vm_rss_bytes()
            # When the frontend gets thousands of random and mutated messages
            storm_through(stranger, settings(LIVE, max_examples=50))
            storm_through(producer, settings(LIVE, max_examples=25))

            # ... and so does the backend, in and out of real sessions holding real records
            # (and a stranger of a random identity each time, gone once it has spoken)
            @settings(LIVE, max_examples=60)
            @given(st.lists(BACKEND_STEPS, min_size=30, max_size=60), STRANGERS)
            def backend_storm(steps: list[BackendStep], identity: bytes) -> None:
                producer.wait(producer.send(proto.encode_hello_producer("8080")))
                producer.send(encode_put([make_record({"n": n}) for n in range(5)]))
                stranger_peer = Peer(identity)
                with sockets(ctx) as connect_stranger:
                    talking = [*peers, stranger_peer]
                    sockets_of = [*dealers, connect_stranger(zmq.DEALER, config.backend,
                                                             identity)]
                    for step in steps:
                        index = step.peer % len(talking)
                        sockets_of[index].send_multipart([b"", *step.frames(talking[index])])
                    barrier(talking, sockets_of)
                producer.wait_all()

            backend_storm()
            grown = vm_rss_bytes() - rss_before
            # Then the broker is up, answers STATS at once, and grew by a bounded amount: what
            # it holds (at most 3 x 2,000 small records and their ids, ten sessions) and what
            # hypothesis keeps of its examples, about 40 MiB here; 192 MiB leaves room for
            # another allocator, and is far from the GiBs that one hostile ACK once cost
            assert broker.alive and broker.error is None
            stats = stranger.wait(stranger.send(proto.encode(Command.STATS)), timeout_s=5)
            assert stats.command is Command.STATS
            assert grown < 192 * 1_048_576, f"the broker's process grew by {grown:,} bytes"
        no_internal_errors(caplog)
        # ... and records flow: a consumer stores every record of a producer's batch once
        db_url = f"sqlite:///{tmp_path / 'fuzz.db'}"
        consumer = Consumer(ConsumerConfig(name="9099", broker=config.backend, db_url=db_url,
                                           heartbeat_ms=200), context=ctx)
        consumer.start()
        try:
            records = [make_record({"n": n}) for n in range(50)]
            with Producer(config.frontend, context=ctx, timeout_ms=5000) as client:
                acks = client.send_batch(records)
            ours = {r.id for r in records}
            assert {a.id for a in acks} == ours and not any(a.duplicate for a in acks)

            def stored() -> list[str]:
                return [row["id"] for row in stored_rows(db_url) if row["id"] in ours]

            wait_until(lambda: len(stored()) == len(ours), timeout_s=20, what="every record")
            assert sorted(stored()) == sorted(ours)
        finally:
            consumer.stop()
    finally:
        broker.stop(timeout_s=5)


def barrier(peers: list[Peer], dealers: list[zmq.Socket[Any]]) -> None:
    """Wait until the broker has handled everything each peer sent, reading (and learning
    from) all it sends meanwhile: a HELLO that cannot register is answered ERR with the
    session it names, after every earlier message of that peer."""
    markers = {dealer: uuid.uuid4().hex for dealer in dealers}
    for dealer in dealers:
        dealer.send_multipart([b"", *proto.encode(Command.HELLO, {
            "role": "barrier", "session": markers[dealer]})])
    poller = zmq.Poller()
    for dealer in dealers:
        poller.register(dealer, zmq.POLLIN)
    by_socket = dict(zip(dealers, peers, strict=True))
    waiting = set(dealers)
    while waiting:
        ready = dict(poller.poll(int(REPLY_TIMEOUT_S * 1000)))
        assert ready, f"no answer to {len(waiting)} barrier(s) within {REPLY_TIMEOUT_S} s"
        for dealer in ready:
            while dealer.poll(0):
                frames = dealer.recv_multipart()
                assert frames[0] == b""
                message = proto.decode(frames[1:])
                assert not internal(message), message.header
                by_socket[dealer].heard(message)
                if message.command is Command.ERR and \
                        message.header.get("session") == markers[dealer]:
                    waiting.discard(dealer)


def test_a_producer_service_answers_a_storm_on_its_ingress_and_stays_up(ctx, caplog):
    # Given a broker and a producer service with an ingress
    config = BrokerConfig(frontend="inproc://fuzz-sf", backend="inproc://fuzz-sb",
                          partitions=2, capacity=5000)
    broker = Broker(config, context=ctx)
    service = ProducerService(ProducerConfig(name="8080", broker=config.frontend,
                                             ingress="inproc://fuzz-ingress"), context=ctx)
    broker.start()
    service.start()
    try:
        with sockets(ctx) as connect:
            client = Requests(connect(zmq.DEALER, "inproc://fuzz-ingress", b"client"))
            # When clients send it random and mutated messages, it answers every one
            storm_through(client, settings(LIVE, max_examples=60))
            # Then it is up and answers STATS
            assert service.alive and service.error is None
            stats = client.wait(client.send(proto.encode(Command.STATS)), timeout_s=5)
            assert stats.command is Command.STATS and stats.header["name"] == "8080"
        no_internal_errors(caplog)
    finally:
        service.stop(timeout_s=5)
        broker.stop(timeout_s=5)


def test_a_consumer_status_port_answers_a_storm_and_stays_up(ctx, tmp_path, caplog):
    # Given a consumer with a status port (and no broker: the port needs none)
    consumer = Consumer(ConsumerConfig(name="9090", broker="inproc://fuzz-nobody",
                                       status="inproc://fuzz-status",
                                       db_url=f"sqlite:///{tmp_path / 'status.db'}"),
                        context=ctx)
    consumer.start()
    try:
        with sockets(ctx) as connect:
            client = Requests(connect(zmq.DEALER, "inproc://fuzz-status", b"client"))
            # When clients send it random and mutated messages, it answers every one
            storm_through(client, settings(LIVE, max_examples=60))
            # Then it is up and answers STATS
            assert consumer.alive and consumer.error is None
            stats = client.wait(client.send(proto.encode(Command.STATS)), timeout_s=5)
            assert stats.command is Command.STATS
        no_internal_errors(caplog)
    finally:
        consumer.stop(timeout_s=5)


# -- 4. found by reading, not fixed here (not this change's files) -------------------------------
def test_a_payload_over_the_size_limit_is_refused_without_being_decoded(monkeypatch):
    decoded: list[int] = []
    check = proto._DECODE_OBJECT

    def counting(payload: bytes) -> Any:
        decoded.append(len(payload))
        return check(payload)

    monkeypatch.setattr(proto, "_DECODE_OBJECT", counting)
    intake = Intake([Partition(0, 10)], DedupeWindow(10), max_payload_bytes=1024)
    bomb = b'{"a":[' + b"{}," * 10_000 + b"{}]}"
    header = {"ids": ["a", "b"], "keys": None, "created_us": 1_000_000,
              "sizes": [2, len(bomb)]}
    result = intake.store(header, b"{}" + bomb, "8080")
    assert [e[:2] for e in result.body["errors"]] == [[1, "TOO_LARGE"]]
    assert len(bomb) not in decoded


def test_a_client_batch_is_cut_into_puts_whose_headers_fit():
    records = [make_record({}, key=f"{n:06d}" + "k" * 1018) for n in range(17_000)]
    puts = fitting_puts(records, list(range(len(records))))
    assert all(len(frames[2]) <= MAX_HEADER_BYTES for _, frames in puts)


def test_a_producer_service_survives_an_ack_body_it_cannot_parse(ctx):
    # Given a producer service holding two clients' PUTs for its broker (a REP here)
    service = ProducerService(ProducerConfig(name="8080", broker="inproc://fuzz-fake-broker",
                                             ingress="inproc://fuzz-ingress-2"), context=ctx)
    with sockets(ctx) as connect:
        fake = ctx.socket(zmq.REP)
        try:
            fake.bind("inproc://fuzz-fake-broker")
            service.start()
            client = Requests(connect(zmq.DEALER, "inproc://fuzz-ingress-2", b"client"))
            assert proto.decode(recv(fake, REPLY_TIMEOUT_S)).command is Command.HELLO
            tags = [client.send(encode_put([make_record({})])) for _ in range(2)]
            client.wait(client.send(proto.encode(Command.STATS)))  # both are held now
            fake.send_multipart(proto.encode(Command.WELCOME, {"partitions": 1}))
            # When the broker answers the first part, and the second with a body too large
            put = proto.decode(recv(fake, REPLY_TIMEOUT_S))
            assert put.command is Command.PUT and len(put.payloads) == 3  # both parts
            fine = proto.dump({"acks": [[0, 1, 0, 0]], "dups": [], "errors": []})
            huge = b'{"pad":"' + b"x" * MAX_HEADER_BYTES + b'"}'
            fake.send_multipart(proto.encode_parts(Command.ACK, [fine, huge]))
            # Then the service is still up, and both clients are answered
            wait_until(lambda: not service.alive or client.sock.poll(0),
                       timeout_s=REPLY_TIMEOUT_S, what="an answer or the service's end")
            assert service.alive, service.error
            assert [client.wait(tag).command for tag in tags] == [Command.ACK, Command.ERR]
        finally:
            service.stop(timeout_s=5)
            fake.close(0)


# Keep the logging of a storm's thousands of refusals out of the way of the failure report.
@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)

