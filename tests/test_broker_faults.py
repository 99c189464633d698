"""Faults the broker must survive without loss: lost messages, stale sessions, hostile ACKs,
peers that do not read, HELLO floods, overdue deliveries (driven through the handlers)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
import zmq
from helpers import (
    batch_rows,
    consumer_says,
    hello,
    only_batch,
    peer,
    producer_says,
    put,
    put_parked,
    recv,
    replies_to,
    to,
)

import zmqlab.broker as broker_module
from zmqlab import protocol as proto
from zmqlab.broker import Broker
from zmqlab.config import BrokerConfig
from zmqlab.protocol import Command


def one_consumer(make_broker: Any, **options: Any) -> tuple[Broker, Any]:
    """Given a broker with producer 8080 and consumer 9090 registered, with credit."""
    broker, clock = make_broker(**options)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 100})
    return broker, clock


def attempts_of(message: proto.Message) -> list[int]:
    return [row[5] for b in message.header["batches"] for row in batch_rows(b)]


def test_a_records_message_lost_on_the_wire_ends_the_session_and_is_delivered_again(
        make_broker):
    # Given a consumer that holds two records whose RECORDS message never reached it
    broker, clock = one_consumer(make_broker, partitions=1)
    put(broker, b"{}", b"{}")
    broker.deliver(clock())
    broker.outbox.clear()  # lost to a TCP reset: ZeroMQ reconnects and nobody hears of it
    token = peer(broker, "9090").session
    # When the consumer keeps heartbeating, reporting only what it saw, past the expiry
    for _ in range(4):
        clock.now += 1.0
        consumer_says(broker, "9090", Command.HEARTBEAT)
        broker.tick(clock())
    # Then the broker ended the session, released the records (not the records' fault) and
    # told the consumer to say HELLO again
    errors = [m for m in to(broker, "9090") if m.command is Command.ERR]
    assert [(e.header["code"], e.header["session"]) for e in errors] == [
        ("NOT_REGISTERED", token)]
    assert broker.counters["resets"] == 1 and broker.partitions[0].inflight == 0
    consumer_says(broker, "9090", Command.HELLO, {"previous": token})
    replies = consumer_says(broker, "9090", Command.FETCH, {"credit": 100})
    (again,) = [m for m in replies if m.command is Command.RECORDS]
    assert attempts_of(again) == [1, 1]


def test_a_consumer_message_lost_on_the_wire_ends_the_session(make_broker):
    broker, _ = one_consumer(make_broker, partitions=1)
    put(broker, b"{}")
    to(broker, "9090")
    peer(broker, "9090").seq += 1  # its ACK was sent but lost: the next message shows a gap
    replies = consumer_says(broker, "9090", Command.HEARTBEAT)
    assert [m.header["code"] for m in replies] == ["NOT_REGISTERED"]
    assert "was lost" in replies[0].header["reason"]
    assert "9090" not in broker.consumers and broker.partitions[0].inflight == 0


def test_a_message_of_an_old_session_is_refused_and_changes_nothing(make_broker):
    # Given records in flight at consumer 9090
    broker, _ = one_consumer(make_broker, partitions=1)
    put(broker, b"{}", b"{}")
    (records,) = to(broker, "9090")
    batch = only_batch(records)
    # When a message names no session, or a made-up one (an impostor with its identity)
    ack = {"acks": [{"partition": 0, "epoch": batch["epoch"], "offsets": batch["offsets"]}]}
    for forged in ({}, {"session": "0" * 32, "seq": 1, "seen": 1}):
        replies = consumer_says(broker, "9090", Command.ACK, {**ack, **forged}, as_is=True)
        # Then it is refused, and nothing was acknowledged
        assert [m.header["code"] for m in replies] == ["NOT_REGISTERED"]
        assert broker.partitions[0].inflight == 2 and broker.counters["acked"] == 0
    # And the real session goes on undisturbed
    consumer_says(broker, "9090", Command.ACK, ack)
    assert broker.partitions[0].depth == 0


@pytest.mark.parametrize(("header", "attempt"), [({"previous": True}, 1), ({}, 2)])
def test_only_a_restart_counts_as_an_attempt_not_a_session_reset(make_broker, header, attempt):
    broker, _ = one_consumer(make_broker, partitions=1)
    put(broker, b"{}")
    to(broker, "9090")
    if header:  # the running consumer resets its own session
        header = {"previous": peer(broker, "9090").session}
    consumer_says(broker, "9090", Command.HELLO, header)
    replies = consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    (records,) = [m for m in replies if m.command is Command.RECORDS]
    assert attempts_of(records) == [attempt]


def test_timing_comes_from_the_welcome_with_the_session(make_broker):
    broker, _ = make_broker(heartbeat_ms=1000, liveness=3, ack_timeout_ms=4000)
    (welcome, *_rest) = consumer_says(broker, "9090", Command.HELLO)
    assert welcome.command is Command.WELCOME
    assert (welcome.header["heartbeat_ms"], welcome.header["liveness"],
            welcome.header["ack_timeout_ms"]) == (1000, 3, 4000)
    assert len(welcome.header["session"]) == 32


def test_records_in_flight_past_the_ack_timeout_are_released_and_the_late_ack_refused(
        make_broker):
    broker, clock = one_consumer(make_broker, partitions=1, ack_timeout_ms=2000,
                                 heartbeat_ms=500)
    put(broker, b"{}")
    (records,) = to(broker, "9090")
    old_epoch = only_batch(records)["epoch"]
    messages = []
    for _ in range(5):  # the consumer is alive but stuck on the record
        clock.now += 0.5
        messages += consumer_says(broker, "9090", Command.HEARTBEAT)
        broker.tick(clock())
    messages += to(broker, "9090")
    (notice,) = [m for m in messages if m.command is Command.ERR]
    assert notice.header["code"] == "ACK_TIMEOUT" and notice.header["epoch"] == old_epoch + 1
    assert broker.counters["ack_timeouts"] == 1
    (again,) = [m for m in messages if m.command is Command.RECORDS]
    assert attempts_of(again) == [2] and only_batch(again)["epoch"] == old_epoch + 1
    late = consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": old_epoch, "offsets": [[0, 1]]}]})
    assert [m.header["code"] for m in late] == ["STALE_EPOCH"]
    assert broker.partitions[0].depth == 1


def test_a_huge_ack_run_is_refused_before_it_is_expanded(make_broker):
    broker, _ = one_consumer(make_broker, partitions=1)
    put(broker, b"{}")
    (records,) = to(broker, "9090")
    tracemalloc.start()
    try:
        replies = consumer_says(broker, "9090", Command.ACK, {"acks": [
            {"partition": 0, "epoch": only_batch(records)["epoch"],
             "offsets": [[0, 20_000_000]]}]})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [m.header["code"] for m in replies] == ["UNKNOWN_OFFSET"]
    assert peak < 5_000_000  # the 20,000,000 offsets were never made
    assert broker.partitions[0].inflight == 1


def test_an_ack_with_more_entries_than_partitions_is_one_error(make_broker):
    broker, _ = one_consumer(make_broker, partitions=2)
    replies = consumer_says(broker, "9090", Command.ACK, {"acks": [{}] * 2000})
    assert [m.header["code"] for m in replies] == ["BAD_MESSAGE"]


def test_a_dead_letter_acknowledged_out_of_order_never_enters_the_dedupe_window(make_broker):
    # Given records a, b, c in flight
    broker, _ = one_consumer(make_broker, partitions=1)
    put(broker, b"{}", b"{}", b"{}", ids=["a", "b", "c"])
    (records,) = to(broker, "9090")
    epoch = only_batch(records)["epoch"]
    # When b is acknowledged as dead before a, and a later
    consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": epoch, "offsets": [[1, 1]], "dead": [1]}]})
    consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": epoch, "offsets": [[0, 1], [2, 1]]}]})
    # Then b left the queue without entering the window: replaying it queues it anew
    assert broker.partitions[0].depth == 0
    assert "b" not in broker.dedupe and "a" in broker.dedupe
    reply = put(broker, b"{}", ids=["b"])
    assert reply.header["dups"] == [] and reply.header["acks"] == [[0, 1, 0, 3]]


@pytest.mark.parametrize(("ids", "key"), [(["nul\x00id"], None), (["fine"], "nul\x00key")])
def test_ids_and_keys_no_database_can_store_are_refused_before_they_are_acked(make_broker, ids,
                                                                              key):
    broker, _ = make_broker()
    hello(broker)
    reply = put(broker, b"{}", ids=ids, key=key)
    assert reply.header["acks"] == []
    (index, code, reason, retryable), = reply.header["errors"]
    assert (code, retryable) == ("INVALID_RECORD", False) and "NUL" in reason


@pytest.mark.parametrize("name", ["x" * 256, "nul\x00name", ""])
def test_producer_names_are_bounded_and_checked(make_broker, name):
    broker, _ = make_broker()
    reply = producer_says(broker, Command.HELLO, {"role": "producer", "name": name})
    assert proto.error_of(reply)[0] == "BAD_MESSAGE"


@pytest.mark.parametrize("name", ["①", "²", "³9090", "፩"])
def test_a_consumer_named_with_a_unicode_digit_registers_and_the_broker_carries_on(make_broker,
                                                                                   name):
    broker, _ = make_broker(partitions=2)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, name, Command.HELLO)
    assert sorted(broker.consumers) == sorted(["9090", name])
    assert {p.target for p in broker.partitions} == {"9090", name}


def test_a_resent_batch_is_located_without_scanning_the_rings(make_broker, monkeypatch):
    # Given 6,000 records held and a producer that resends a 1,000-record batch
    broker, _ = make_broker(partitions=6, capacity=2000)
    hello(broker)
    ids = [f"id-{i}" for i in range(1000)]
    put(broker, *([b"{}"] * 5000), ids=[f"other-{i}" for i in range(5000)])
    first = put(broker, *([b"{}"] * 1000), ids=ids)
    scans = []
    for partition in broker.partitions:
        monkeypatch.setattr(partition, "_ids", _Counting(partition._ids, scans))
    # When the same batch comes again
    again = put(broker, *([b"{}"] * 1000), ids=ids)
    # Then every record is answered with its first position, and no ring was scanned
    placed = {(i + k): (p, o + k) for i, n, p, o in first.header["acks"] for k in range(n)}
    assert {d[0]: (d[1], d[2]) for d in again.header["dups"]} == placed
    assert scans == []


class _Counting(list):  # type: ignore[type-arg]
    def __init__(self, items: list[Any], calls: list[Any]) -> None:
        super().__init__(items)
        self.calls = calls

    def index(self, *args: Any) -> int:  # type: ignore[override]
        self.calls.append(args[0])
        return super().index(*args)


def test_registrations_cost_the_partitions_not_every_consumer(make_broker, monkeypatch):
    calls = []
    original = broker_module.consumer_order

    def counted(name: str) -> Any:
        calls.append(name)
        return original(name)

    monkeypatch.setattr(broker_module, "consumer_order", counted)
    broker, _ = make_broker(partitions=6)
    for n in range(1000):
        consumer_says(broker, str(10_000 + n), Command.HELLO)
    assert len(calls) < 1000 * 20  # a sort over every consumer per HELLO is 500,000
    assert [p.target for p in broker.partitions] == [str(10_000 + n) for n in range(6)]


def test_expected_nodes_count_live_registrations_and_the_broker_stays_ready(make_broker):
    broker, clock = make_broker(expect_consumers=2)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    clock.now += 10
    broker.tick(clock())  # 9090 expired: it no longer counts
    hello(broker)
    consumer_says(broker, "9091", Command.HELLO)
    assert proto.error_of(put(broker, b"{}"))[0] == "NOT_READY"
    consumer_says(broker, "9092", Command.HELLO)
    assert put(broker, b"{}").command is Command.ACK
    clock.now += 10
    broker.tick(clock())  # everybody expired; once ready, the broker stays ready
    hello(broker)
    assert put(broker, b"{}").command is Command.ACK


def test_a_parked_put_holds_a_later_one_for_the_same_key_so_the_key_keeps_its_order(
        make_broker):
    # Given a full one-partition broker whose consumer holds two records
    broker, clock = make_broker(partitions=1, capacity=3, put_wait_ms=500)
    hello(broker)
    hello(broker, b"req-2", "8081")
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    put(broker, b"{}", b"{}", key="k")
    (held,) = to(broker, "9090")
    # When a PUT of two records for key k must wait, and a later one of one record would fit
    put_parked(broker, b'{"n":1}', b'{"n":2}', key="k")
    put_parked(broker, b'{"n":3}', key="k", who=b"req-2")
    assert replies_to(broker, b"req-2") == []  # it waits its turn though it fits
    # Then once the consumer acks, both are stored in the order they came
    consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": only_batch(held)["epoch"], "offsets": [[0, 2]]}]})
    broker.unpark(clock())
    assert len(replies_to(broker, b"req-1")) == 1 and len(replies_to(broker, b"req-2")) == 1
    (records,) = to(broker, "9090")
    assert [row[0] for row in batch_rows(only_batch(records))] == [2, 3, 4]
    assert records.payloads[0].split(b"}")[:3] == [b'{"n":1', b'{"n":2', b'{"n":3']


def test_a_records_message_is_at_most_one_frame(make_broker, monkeypatch):
    monkeypatch.setattr(broker_module, "MAX_FRAME_BYTES", 25)
    broker, _ = one_consumer(make_broker, partitions=1)
    put(broker, *[b'{"pad":"0123456789"}'] * 3)  # 20 bytes each
    messages = [m for m in to(broker, "9090") if m.command is Command.RECORDS]
    assert [len(m.payloads[0]) for m in messages] == [20]  # the rest waits for the ACK


def test_a_peer_that_never_reads_cannot_stall_the_broker(ctx):
    # Given a running broker, and a peer on the backend that sends without ever reading
    config = BrokerConfig(frontend="inproc://faults-f", backend="inproc://faults-b",
                          partitions=1)
    broker = Broker(config, context=ctx)
    broker.start()
    hostile = ctx.socket(zmq.DEALER)
    client = ctx.socket(zmq.REQ)
    try:
        hostile.setsockopt(zmq.LINGER, 0)
        hostile.setsockopt(zmq.RCVHWM, 10)
        hostile.setsockopt(zmq.IDENTITY, b"9099")
        hostile.connect(config.backend)
        for _ in range(5000):  # each is answered with an ERR it never reads
            hostile.send_multipart([b"", *proto.encode(Command.HEARTBEAT)])
        # When a client asks for STATS
        client.setsockopt(zmq.LINGER, 0)
        client.connect(config.frontend)
        client.send_multipart(proto.encode(Command.STATS))
        # Then it is answered, and the broker dropped the hostile peer's replies, not waited
        reply = proto.decode(recv(client, timeout_s=5))
        assert reply.command is Command.STATS
    finally:
        hostile.close(0)
        client.close(0)
        broker.stop(timeout_s=5)
    assert broker.counters["dropped"] > 0
