"""The producer clients and the producer service at their edges: names, ids and keys the wire
and the database cannot carry, frames too large for a socket, a backlog bounded in bytes, a
client that floods the service without reading, the broker's timing taken from its WELCOME,
and a client's registration (BYE on close; HELLO again when the broker forgot it).

Scripted peers are plain sockets answering by hand; every receive and wait is bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq
from helpers import Fabric, recv, wait_until

from zmqlab import producer as producer_module
from zmqlab import protocol as proto
from zmqlab.config import ProducerConfig
from zmqlab.errors import ConfigError, ErrorCode
from zmqlab.pipelined import PipelinedProducer
from zmqlab.producer import (
    OutRecord,
    Producer,
    ProducerService,
    encode_put,
    make_record,
)
from zmqlab.protocol import MAX_FRAME_BYTES, MAX_NAME_CHARS, SOCKET_HWM, Command

BAD_NAMES = ["", "x" * (MAX_NAME_CHARS + 1), "a\x00b"]


def _socket(ctx: zmq.Context[Any], kind: int, **options: int) -> zmq.Socket[Any]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    return sock


def _answer(server: zmq.Socket[Any], frames: list[bytes], reply: list[bytes]) -> None:
    """Answer a REQ or DEALER request that ``server`` (a ROUTER) received as ``frames``."""
    route, _ = proto.split_envelope(frames)
    server.send_multipart(proto.envelope(route, reply))


def _request(frames: list[bytes]) -> proto.Message:
    return proto.decode(proto.split_envelope(frames)[1])


def _ack_all(message: proto.Message, first: int) -> list[bytes]:
    count = len(message.header["ids"])
    return proto.encode_parts(Command.ACK, [proto.dump(
        {"acks": [[0, count, 0, first]], "dups": [], "errors": []})])


# -- what no PUT can carry: refused with ConfigError before anything is sent --------------------
@pytest.mark.parametrize("name", BAD_NAMES)
def test_producer_names_the_broker_and_the_database_cannot_take_are_refused(ctx, name) -> None:
    with pytest.raises(ConfigError, match="producer name"):
        Producer("inproc://nowhere", name=name, context=ctx)
    with pytest.raises(ConfigError, match="producer name"):
        PipelinedProducer("inproc://nowhere", name=name, context=ctx)
    with pytest.raises(ConfigError, match="name"):
        ProducerService(ProducerConfig(name=name, broker="inproc://nowhere"), context=ctx)


def test_a_producer_name_of_the_longest_length_is_taken(ctx) -> None:
    name = "é" * MAX_NAME_CHARS  # characters, not bytes
    with Producer("inproc://nowhere", name=name, context=ctx) as client:
        assert client.name == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_producer_config_refuses_the_same_names(name) -> None:
    try:
        ProducerConfig(name=name)
    except ConfigError:
        return
    raise AssertionError(f"ProducerConfig took {name!r:.40}")


def test_ids_and_keys_with_nul_are_refused_by_make_record_and_encode_put() -> None:
    # Given ids and keys that PostgreSQL cannot store in a text column
    with pytest.raises(ConfigError, match="NUL"):
        make_record({"a": 1}, id="a\x00b")
    with pytest.raises(ConfigError, match="NUL"):
        make_record({"a": 1}, key="k\x00")
    # When records are built by hand, bypassing make_record, encode_put still refuses them
    good = make_record({"a": 1}, id="fine", key="fine")
    for bad in (good._replace(id="x\x00"), good._replace(key="\x00")):
        with pytest.raises(ConfigError, match="NUL"):
            encode_put([good, bad])
    assert encode_put([good])[1] == Command.PUT.value


@pytest.fixture
def small_frames(monkeypatch) -> int:
    """Frames of 1000 bytes on the client side, so that a test need not allocate 64 MiB."""
    monkeypatch.setattr(producer_module, "MAX_FRAME_BYTES", 1000, raising=False)
    return 1000


def _padded(i: int, size: int = 300) -> OutRecord:
    return make_record(f'{{"i":{i:4d},"pad":"{"x" * (size - 21)}"}}', id=f"r{i}")


def test_a_record_larger_than_a_frame_is_refused_before_anything_is_sent(ctx,
                                                                         small_frames) -> None:
    with pytest.raises(ConfigError, match="one frame"):
        make_record("x" * (small_frames + 1))
    huge = OutRecord(b"{}" + b" " * small_frames, "huge", None, 0.0)
    client = Producer("inproc://nowhere", context=ctx, timeout_ms=100, retries=0)
    with pytest.raises(ConfigError, match="one frame holds"):
        client.send_batch([_padded(0), huge])
    assert client._sock is None  # nothing was sent, not even the first record
    client.close()


def test_the_pipelined_client_refuses_a_batch_larger_than_a_frame(ctx, small_frames) -> None:
    client = PipelinedProducer("inproc://nowhere", context=ctx, window=2)
    with pytest.raises(ConfigError, match="one frame holds"):
        client.submit([_padded(i) for i in range(4)])  # 1200 payload bytes
    assert client.in_flight == 0 and client.stats["sent"] == 0
    client.submit([_padded(i) for i in range(3)])  # 900 bytes: one request
    assert client.in_flight == 1
    client.close()


def test_a_batch_larger_than_a_frame_goes_as_several_puts_in_order(ctx, endpoint,
                                                                   small_frames) -> None:
    """Given a batch of ten 300-byte records and frames of 1000 bytes,
    when a Producer sends it, then it goes as several PUTs whose frames fit, in order, and
    every record gets its own ack."""
    url = endpoint("splitting-peer")
    server = _socket(ctx, zmq.ROUTER)
    server.bind(url)
    records = [_padded(i) for i in range(10)]
    result: queue.Queue[Any] = queue.Queue()

    def send() -> None:
        with Producer(url, context=ctx, timeout_ms=5000) as client:
            try:
                result.put(client.send_batch(records))
            except BaseException as exc:  # reported by the test thread
                result.put(exc)

    sender = threading.Thread(target=send)
    sender.start()
    puts: list[list[str]] = []
    try:
        stored = 0
        while len([i for ids in puts for i in ids]) < len(records):
            frames = recv(server)
            message = _request(frames)
            if message.command is Command.HELLO:
                _answer(server, frames, proto.encode(Command.WELCOME, {"partitions": 1}))
                continue
            assert message.command is Command.PUT
            assert all(len(f) <= small_frames for f in message.payloads)
            puts.append(message.header["ids"])
            _answer(server, frames, _ack_all(message, stored))
            stored += len(message.header["ids"])
        frames = recv(server)  # the BYE of close()
        assert _request(frames).command is Command.BYE
        _answer(server, frames, proto.encode(Command.BYE))
        sender.join(10)
    finally:
        server.close(0)
    acks = result.get(timeout=1)
    assert not isinstance(acks, BaseException), acks
    assert len(puts) > 1 and [i for ids in puts for i in ids] == [r.id for r in records]
    assert [(a.id, a.offset) for a in acks] == [(r.id, n) for n, r in enumerate(records)]


# -- the producer service: bounded in bytes, never stalled by a client --------------------------
def _service(ctx: zmq.Context[Any], endpoint: Callable[[str], str],
             **options: Any) -> tuple[ProducerService, str]:
    ingress = endpoint("ingress")
    options.setdefault("broker", endpoint("nobroker"))  # nobody there: PUTs wait in the backlog
    service = ProducerService(ProducerConfig(name="8080", ingress=ingress, **options),
                              context=ctx)
    service.start()
    return service, ingress


def test_the_service_refuses_a_put_that_would_pass_its_backlog_in_bytes(ctx, endpoint) -> None:
    """Given a service whose broker does not answer, holding one PUT of 33 MiB of payload,
    when a second PUT of 33 MiB arrives (two records in all, far under max_pending),
    then it is refused UNAVAILABLE (retryable) at once: the backlog is bounded in bytes."""
    service, ingress = _service(ctx, endpoint, max_pending_bytes=MAX_FRAME_BYTES)
    client = _socket(ctx, zmq.DEALER)
    client.connect(ingress)
    size = MAX_FRAME_BYTES // 2 + 1_048_576
    try:
        header = {"ids": ["big-1"], "sizes": [size]}
        client.send_multipart([b"t1", b"", *proto.encode(Command.PUT, header, [b" " * size])])
        wait_until(lambda: service.snapshot()["pending"] == 1, 5, "the first PUT held")
        header = {"ids": ["big-2"], "sizes": [size]}
        client.send_multipart([b"t2", b"", *proto.encode(Command.PUT, header, [b" " * size])])
        frames = recv(client, 5.0)
        assert frames[:2] == [b"t2", b""]
        code, reason, retryable = proto.error_of(proto.decode(frames[2:]))
        assert (code, retryable) == (ErrorCode.UNAVAILABLE, True)
        assert f"{size} payload bytes" in reason
        assert (service.snapshot()["pending"], service.snapshot()["pending_bytes"]) == (1, size)
    finally:
        client.close(0)
        service.stop()


def test_a_client_that_never_reads_cannot_stall_the_service_or_grow_it(ctx, endpoint,
                                                                      caplog) -> None:
    """Given a client that sends many STATS requests and reads none of the replies,
    then the service drops the replies its pipe cannot hold (counted, logged a few times, not
    once each), queues no more than the high-water mark for it, and answers others at once."""
    caplog.set_level(logging.WARNING, logger="zmqlab.producer")
    service, ingress = _service(ctx, endpoint)
    hostile = _socket(ctx, zmq.DEALER, rcvhwm=1, sndtimeo=10_000)
    hostile.connect(ingress)
    polite = _socket(ctx, zmq.REQ)
    polite.connect(ingress)
    requests = 4 * SOCKET_HWM
    room = SOCKET_HWM + 1  # over inproc a pipe holds the sender's SNDHWM + the reader's RCVHWM
    try:
        for _ in range(requests):
            hostile.send_multipart([b"", *proto.encode(Command.STATS)])
        dropped = wait_until(lambda: service.snapshot().get("dropped_replies", 0)
                             >= requests - room and service.snapshot()["dropped_replies"], 10,
                             f"all but {room} replies to the hostile client dropped")
        polite.send_multipart(proto.encode(Command.STATS))
        assert proto.decode(recv(polite, 5.0)).command is Command.STATS
        queued = 0
        while hostile.poll(0):
            hostile.recv_multipart()
            queued += 1
    finally:
        hostile.close(0)
        polite.close(0)
        service.stop()
    assert queued == requests - dropped <= room
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(warnings) <= 3, warnings
    assert service.alive is False


def test_the_service_heartbeats_and_times_out_the_broker_by_its_welcome(ctx, endpoint) -> None:
    """Given a service configured to heartbeat every 10 s and wait 5 s for answers,
    and a broker whose WELCOME says heartbeat 50 ms, liveness 3,
    then the service heartbeats at the broker's pace, and a broker silent for 150 ms is
    reconnected to (a new HELLO), not after the service's own 5 s."""
    broker_url = endpoint("scripted-broker")
    broker = _socket(ctx, zmq.ROUTER)
    broker.bind(broker_url)
    service, _ = _service(ctx, endpoint, broker=broker_url, heartbeat_ms=10_000,
                          timeout_ms=5000)
    try:
        hello = recv(broker, 5.0)
        assert _request(hello).command is Command.HELLO
        _answer(broker, hello, proto.encode(Command.WELCOME, {
            "partitions": 1, "heartbeat_ms": 50, "liveness": 3, "ready": True}))
        beat = recv(broker, 2.0)
        assert _request(beat).command is Command.HEARTBEAT
        _answer(broker, beat, proto.encode(Command.HEARTBEAT))
        assert _request(recv(broker, 2.0)).command is Command.HEARTBEAT  # left unanswered
        began = time.monotonic()
        again = recv(broker, 2.0)
        assert _request(again).command is Command.HELLO
        assert time.monotonic() - began < 2.0
        assert service.stats["reconnects"] == 1
    finally:
        service.stop()
        broker.close(0)


# -- the client's registration: BYE on close, HELLO again when forgotten ------------------------
def _producer_names(fabric: Fabric) -> list[str]:
    return [p["name"] for p in fabric.status()["producers"]]


def test_closing_a_producer_says_bye_so_the_broker_forgets_it_at_once(ctx, db_url) -> None:
    # Given a broker that would expire a silent producer only after 30 s
    fabric = Fabric(ctx, db_url, producers=0, consumers=0, heartbeat_ms=10_000).start()
    try:
        client = fabric.client(name="leaving")
        client.send({"n": 1})
        assert _producer_names(fabric) == ["leaving"]
        # When it is closed
        client.close()
        # Then the broker has already forgotten it (close waited for the answer to BYE)
        assert _producer_names(fabric) == []
    finally:
        fabric.stop()


def test_close_never_hangs_on_a_peer_that_went_silent(ctx, endpoint) -> None:
    url = endpoint("silent-after-hello")
    server = _socket(ctx, zmq.ROUTER)
    server.bind(url)
    result: queue.Queue[Any] = queue.Queue()
    client = Producer(url, context=ctx, timeout_ms=5000)
    sender = threading.Thread(target=lambda: result.put(client.send({"n": 1})))
    sender.start()
    try:
        for _ in range(2):  # HELLO, then the PUT; then the peer goes silent
            frames = recv(server)
            message = _request(frames)
            reply = (_ack_all(message, 0) if message.command is Command.PUT
                     else proto.encode(Command.WELCOME, {"partitions": 1}))
            _answer(server, frames, reply)
        sender.join(10)
        assert result.get(timeout=1).offset == 0
        began = time.monotonic()
        client.close()
        assert time.monotonic() - began < 2.0
        assert _request(recv(server)).command is Command.BYE  # it went out all the same
    finally:
        server.close(0)


def test_an_idle_producer_the_broker_expired_registers_again_even_without_retries(
        ctx, db_url) -> None:
    """Given a client with retries=0 and a broker that expires a producer silent for 150 ms,
    when the client sends, idles until the broker forgot it, and sends again,
    then the broker's NOT_REGISTERED answer leads to HELLO and the same PUT, not an error."""
    fabric = Fabric(ctx, db_url, producers=0, consumers=0, heartbeat_ms=50).start()
    try:
        with fabric.client(name="idler", retries=0) as client:
            first = client.send({"n": 1})
            wait_until(lambda: "idler" not in _producer_names(fabric), 5,
                       "the broker to expire the idle producer")
            second = client.send({"n": 2})
            assert second.id != first.id and not second.duplicate
            assert client.stats["reconnects"] == 0  # no try was spent: the broker answered
            assert "idler" in _producer_names(fabric)
    finally:
        fabric.stop()
