"""Integration: three producer services, the broker and three consumers in one process over
inproc, persisting into SQLite (and, in test_postgres.py, PostgreSQL)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import zmq
from helpers import Fabric, recv, run_seed_scenario, stored_rows, wait_until

from zmqlab import protocol as proto
from zmqlab.producer import make_record
from zmqlab.protocol import Command


def test_every_record_acknowledged_stored_once_and_removed(ctx, db_url):
    run_seed_scenario(ctx, db_url)


def test_queue_keeps_a_delivered_record_until_it_is_acknowledged(ctx, db_url, endpoint):
    """Given a consumer that takes a record and never acknowledges it,
    then the broker keeps it (in flight); when that consumer vanishes, the record is released
    and a real consumer stores it, with its attempt raised."""
    fabric = Fabric(ctx, db_url, producers=0, consumers=0, partitions=1)
    fabric.start()
    silent = ctx.socket(zmq.DEALER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.setsockopt(zmq.IDENTITY, b"9095")
    silent.connect(fabric.backend)
    try:
        silent.send_multipart([b"", *proto.encode(Command.HELLO, {"role": "consumer"})])
        welcome = proto.decode(recv(silent)[1:])
        assert welcome.command is Command.WELCOME
        assign = proto.decode(recv(silent)[1:])  # seq 1 of the session
        assert (assign.command, assign.header["seq"]) == (Command.ASSIGN, 1)
        silent.send_multipart([b"", *proto.encode(Command.FETCH, {
            "credit": 10, "session": welcome.header["session"], "seq": 1, "seen": 1})])
        with fabric.client() as client:
            ack = client.send({"keep": "me"})

        def records() -> proto.Message | None:
            message = proto.decode(recv(silent)[1:])
            return message if message.command is Command.RECORDS else None

        delivered = wait_until(records, what="RECORDS")
        assert delivered.header["batches"][0]["ids"] == [ack.id]
        snap = fabric.status()["partitions"][0]
        assert (snap["depth"], snap["inflight"], snap["owner"]) == (1, 1, "9095")

        # The silent consumer disappears without BYE: expiry releases its record.
        silent.close(0)
        fabric.add_consumer("9090")
        rows = wait_until(lambda: stored_rows(db_url), what="the released record stored")
        assert [(r["id"], r["attempt"], r["consumer"]) for r in rows] == [(ack.id, 2, "9090")]
        wait_until(lambda: fabric.status()["partitions"][0]["depth"] == 0, what="removal")
    finally:
        fabric.stop()


def test_producer_service_groups_concurrent_clients_into_one_batch(ctx, endpoint):
    """Given a broker that holds its answer to a first client's PUT until seven more clients
    have sent theirs, the producer service forwards those seven as one PUT of seven parts,
    frames untouched, and each client gets exactly its own part's answer."""
    from zmqlab import Producer, ProducerConfig, ProducerService

    broker_address, ingress = endpoint("fake-broker"), endpoint("ingress")
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(broker_address)
    service = ProducerService(ProducerConfig(name="8080", broker=broker_address, ingress=ingress),
                              context=ctx)
    service.start()
    puts: list[list[int]] = []
    stored = 0

    def answer(frames: list[bytes]) -> None:
        nonlocal stored
        message = proto.decode(frames[2:])
        if message.command is Command.HELLO:
            reply = proto.encode(Command.WELCOME, {"partitions": 1})
        else:
            bodies, counts = [], []
            for header, blob in proto.put_parts(message):
                part = proto.parse_header(header)
                ids = part["ids"]
                assert sum(proto.column(part, "sizes", len(ids))) == len(blob)
                counts.append(len(ids))
                bodies.append(proto.dump({"acks": [[0, len(ids), 0, stored]], "dups": [],
                                          "errors": []}))
                stored += len(ids)
            puts.append(counts)
            reply = proto.encode_parts(Command.ACK, bodies)
        broker.send_multipart([*frames[:2], *reply])

    results: dict[int, list[int]] = {}

    def client(n: int) -> None:
        with Producer(ingress, context=ctx, timeout_ms=10_000) as c:
            results[n] = [a.offset for a in c.send_batch([make_record({"i": i})
                                                          for i in range(50)])]

    try:
        answer(recv(broker))  # HELLO
        first = threading.Thread(target=client, args=(0,))
        first.start()
        held = recv(broker)  # the first client's PUT: not answered yet
        others = [threading.Thread(target=client, args=(n,)) for n in range(1, 8)]
        for t in others:
            t.start()
        with Producer(ingress, context=ctx) as probe:
            wait_until(lambda: probe.status()["pending"] == 350, what="7 clients waiting")
        answer(held)
        answer(recv(broker))  # the seven, together
        for t in [first, *others]:
            t.join(30)
        assert puts == [[50], [50] * 7]
        assert sorted(o for offsets in results.values() for o in offsets) == list(range(400))
        assert all(len(offsets) == 50 for offsets in results.values()) and len(results) == 8
    finally:
        service.stop()
        broker.close(0)


def test_put_batch_reports_runs_and_refusals_without_raising(ctx, db_url):
    fabric = Fabric(ctx, db_url, producers=1, consumers=0, partitions=1).start()
    try:
        records = [make_record({"ok": 1}), make_record(b"not json"), make_record({"ok": 2})]
        with fabric.client("8080") as c:
            outcome = c.put_batch(records)
            again = c.put_batch([records[2]])  # a retry of a stored record: a duplicate
        assert outcome.acked == 2 and outcome.acked_indices() == [0, 2]
        assert [(r.id, r.code) for r in outcome.refusals] == [(records[1].id, "INVALID_RECORD")]
        assert [(a.id, a.partition, a.offset) for a in outcome.acks(records)] == [
            (records[0].id, 0, 0), (records[2].id, 0, 1)]
        assert again.dups == [(0, 0, 1)] and not again.placed and again.acked == 1
        assert again.acks([records[2]])[0].duplicate
    finally:
        fabric.stop()


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b'{"a": 1'])
def test_invalid_payloads_are_refused_and_the_rest_accepted(ctx, db_url, payload):
    fabric = Fabric(ctx, db_url, producers=1, consumers=0).start()
    try:
        from zmqlab.errors import RecordsRefused

        with fabric.client("8080") as c, pytest.raises(RecordsRefused) as caught:
            c.send_batch([make_record({"ok": 1}), make_record(payload), make_record({"ok": 2})])
        assert [r.code for r in caught.value.refusals] == ["INVALID_RECORD"]
        assert len(caught.value.acks) == 2
        assert sum(p["depth"] for p in fabric.status()["partitions"]) == 2
    finally:
        fabric.stop()


def test_a_malformed_client_batch_is_refused_without_touching_other_clients(ctx, db_url):
    fabric = Fabric(ctx, db_url, producers=1, consumers=0).start()
    try:
        bad = ctx.socket(zmq.REQ)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(fabric.ingress["8080"])
        bad.send_multipart(proto.encode(Command.PUT, {"ids": ["x"], "created_us": 1,
                                                      "sizes": [99]}, [b"{}"]))
        reply = proto.decode(recv(bad))
        assert proto.error_of(reply)[0] == "BAD_MESSAGE"
        bad.close(0)
        with fabric.client("8080") as good:
            assert good.send({"fine": True}).offset == 0
        assert sum(p["depth"] for p in fabric.status()["partitions"]) == 1
    finally:
        fabric.stop()


def test_a_producer_service_refuses_clients_once_its_backlog_is_full(ctx, db_url, endpoint):
    from zmqlab import ProducerConfig, ProducerService

    # No broker at this address: everything a client sends waits in the service's backlog.
    ingress = endpoint("ingress")
    service = ProducerService(ProducerConfig(name="8089", broker=endpoint("nobroker"),
                                             ingress=ingress, max_pending=10), context=ctx)
    service.start()
    try:
        first = ctx.socket(zmq.REQ)
        first.setsockopt(zmq.LINGER, 0)
        first.connect(ingress)
        from zmqlab.producer import encode_put

        first.send_multipart(encode_put([make_record({"n": n}) for n in range(8)]))
        with fabric_client(ctx, ingress) as second:
            from zmqlab.errors import RecordsRefused

            try:
                second.send_batch([make_record({"n": n}) for n in range(5)])
            except RecordsRefused as exc:
                assert exc.code == "UNAVAILABLE" and "holds 8 records" in exc.reason
            else:
                raise AssertionError("the backlog was not bounded")
        first.close(0)
    finally:
        service.stop()


def fabric_client(ctx: zmq.Context[Any], address: str) -> Any:
    from zmqlab import Producer

    return Producer(address, context=ctx, timeout_ms=1000, retries=0, deadline_s=0.1)
