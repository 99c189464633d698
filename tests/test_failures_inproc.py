"""Failure handling in one process: poison records, busy and failing databases, lost replies,
broker restarts. (Killed processes and network cuts are in test_chaos.py and test_netns.py.)"""

from __future__ import annotations

import threading
from typing import Any

import zmq
from helpers import Fabric, consumer_says, hello, put, recv, stored_rows, to, wait_until

from zmqlab import protocol as proto
from zmqlab.deadletters import list_dead, replay
from zmqlab.errors import SinkUnavailable
from zmqlab.producer import Producer, make_record
from zmqlab.protocol import Command
from zmqlab.store import Batch, Delivery, Sink, make_engine


def queue_empty(fabric: Fabric) -> bool:
    return all(p["depth"] == 0 for p in fabric.status()["partitions"])


def test_a_poison_record_goes_to_dead_letters_while_the_others_flow_and_can_be_replayed(
        ctx, db_url):
    fabric = Fabric(ctx, db_url, producers=1, consumers=0, partitions=2).start()
    consumer = fabric.add_consumer("9090", transform="transforms:refuse_poison", max_attempts=3,
                                   retry_initial_s=0.01)
    try:
        with fabric.client("8080") as client:
            records = [make_record({"n": n, "poison": n == 7}) for n in range(40)]
            client.send_batch(records)
        wait_until(lambda: len(stored_rows(db_url)) == 39, what="the healthy records")
        wait_until(lambda: queue_empty(fabric), what="the poison record to leave the queue")
        (dead,) = list_dead(db_url)
        assert (dead["id"], dead["attempts"]) == (records[7].id, 3)
        assert "poison record" in dead["last_error"] and '"poison":true' in dead["payload"]
        assert consumer.stats["dead"] == 1
        assert fabric.status()["counters"]["dead"] == 1

        # Once the consumer is fixed (no transform), a replay stores it under its own id.
        consumer.stop()
        fabric.add_consumer("9091")
        report = replay(db_url, fabric.ingress["8080"], context=ctx)
        assert [a.id for a in report.replayed] == [records[7].id]
        assert not report.replayed[0].duplicate  # dead letters are not in the dedupe window
        wait_until(lambda: len(stored_rows(db_url)) == 40, what="the replayed record")
        assert list_dead(db_url) == []
    finally:
        fabric.stop()


def bury(db_url: str, *ids: str) -> None:
    """Dead letters for ``ids``, as a consumer would have written them."""
    from datetime import UTC, datetime

    from zmqlab.store import DEAD_LETTERS

    engine = make_engine(db_url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(DEAD_LETTERS.insert(), [
            {"id": i, "partition": 0, "offset": n, "key": None, "producer": "8080",
             "consumer": "9090", "payload": f'{{"n": {n}}}', "created_at": now,
             "failed_at": now, "attempts": 3, "last_error": "poison (test)"}
            for n, i in enumerate(ids)])
    engine.dispose()


def test_replay_deletes_a_dead_letter_only_where_the_record_exists_elsewhere(ctx, endpoint,
                                                                              db_url):
    """Case 4: given three dead letters, and a broker that queues "new" anew but answers
    "stored" and "lost" as duplicates, where only "stored" is in ``records``: then replay
    deletes "new" and "stored", and keeps "lost" (it exists nowhere else) and reports it."""
    address = endpoint("replay")
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(address)
    bury(db_url, "new", "stored", "lost")
    sink = Sink.open(db_url, "9090")
    sink.store([Batch(0, 1, [Delivery(0, 9, "stored", None, "8080", 1_700_000_000.0, 1, b"{}")])])
    sink.close()

    def serve() -> None:
        while True:
            frames = recv(server, 10)
            message = proto.decode(frames[2:])
            if message.command is Command.HELLO:
                reply = proto.encode(Command.WELCOME, {"partitions": 1})
            else:
                ids = message.header["ids"]
                reply = proto.encode(Command.ACK, {
                    "acks": [[n, 1, 0, 40] for n, i in enumerate(ids) if i == "new"],
                    "dups": [[n, 0, 7] for n, i in enumerate(ids) if i != "new"],
                    "errors": []})
            server.send_multipart([*frames[:2], *reply])
            if message.command is Command.PUT:
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        report = replay(db_url, address, context=ctx, timeout_ms=2000, retries=0)
    finally:
        thread.join(10)
        server.close(0)
    assert sorted((a.id, a.duplicate) for a in report.replayed) == [("new", False),
                                                                     ("stored", True)]
    assert [(a.id, a.duplicate) for a in report.kept] == [("lost", True)]
    assert [d["id"] for d in list_dead(db_url)] == ["lost"]


def test_a_replay_answered_duplicate_keeps_the_dead_letter_until_the_record_is_stored(
        ctx, db_url):
    """Given a dead letter whose id the broker still holds in its queue (sent again by a
    producer), when it is replayed, then the broker answers duplicate and the dead letter is
    kept; once a consumer stored the record, a second replay clears it."""
    fabric = Fabric(ctx, db_url, producers=1, consumers=0, partitions=1).start()
    try:
        bury(db_url, "twice")
        with fabric.client("8080") as client:
            client.send({"n": 0}, id="twice")  # held: no consumer yet
        first = replay(db_url, fabric.ingress["8080"], context=ctx)
        assert first.replayed == [] and [a.id for a in first.kept] == ["twice"]
        assert [d["id"] for d in list_dead(db_url)] == ["twice"]
        fabric.add_consumer("9090")
        wait_until(lambda: [r["id"] for r in stored_rows(db_url)] == ["twice"],
                   what="the held record stored")
        second = replay(db_url, fabric.ingress["8080"], context=ctx)
        assert [(a.id, a.duplicate) for a in second.replayed] == [("twice", True)]
        assert list_dead(db_url) == []
    finally:
        fabric.stop()


class GatedSink(Sink):
    """A sink whose transactions wait for a gate, or fail while ``down`` is set."""

    gate = threading.Event()
    down = threading.Event()

    def store(self, batches):  # type: ignore[no-untyped-def]
        if self.down.is_set():
            raise SinkUnavailable("database is down (test)")
        if not self.gate.wait(30):
            raise SinkUnavailable("gate never opened")
        return super().store(batches)


def gated_fabric(ctx: zmq.Context[Any], db_url: str, partitions: int, *, gate_open: bool,
                 down: bool, **options: Any) -> tuple[Fabric, Any]:
    """A broker (no producer services) and consumer 9090 writing through GatedSink."""
    (GatedSink.gate.set if gate_open else GatedSink.gate.clear)()
    (GatedSink.down.set if down else GatedSink.down.clear)()
    fabric = Fabric(ctx, db_url, producers=0, consumers=0, partitions=partitions,
                    heartbeat_ms=100)
    fabric.start()
    return fabric, gated_consumer(ctx, fabric, **options)


def gated_consumer(ctx: zmq.Context[Any], fabric: Fabric, **options: Any) -> Any:
    """A consumer 9090 writing through GatedSink, registered with the fabric's broker."""
    from zmqlab import Consumer, ConsumerConfig

    consumer = Consumer(ConsumerConfig(name="9090", broker=fabric.backend, db_url=fabric.db_url,
                                       heartbeat_ms=100, **options), context=ctx,
                        sink_factory=lambda: GatedSink(make_engine(fabric.db_url), "9090"))
    consumer.start()
    wait_until(lambda: consumer.registered, what="registration")
    return consumer


def test_a_consumer_busy_in_a_long_transaction_is_not_declared_dead(ctx, db_url):
    fabric, consumer = gated_fabric(ctx, db_url, 1, gate_open=False, down=False)
    try:
        with fabric.client() as client:
            client.send_batch([make_record({"n": n}) for n in range(10)])
        wait_until(lambda: fabric.status()["partitions"][0]["inflight"] == 10, what="delivery")
        # The transaction stays stuck for many expiry periods (3 x 100 ms): 12 heartbeats.
        beats = consumer.stats["heartbeats"]
        wait_until(lambda: consumer.stats["heartbeats"] >= beats + 12, what="heartbeats")
        snap = fabric.status()
        assert snap["counters"]["expired"] == 0 and snap["consumers"][0]["name"] == "9090"
        assert snap["partitions"][0]["owner"] == "9090"
        GatedSink.gate.set()
        wait_until(lambda: len(stored_rows(db_url)) == 10, what="the batch stored")
        assert {r["attempt"] for r in stored_rows(db_url)} == {1}
        wait_until(lambda: queue_empty(fabric), what="acks")
    finally:
        GatedSink.gate.set()
        consumer.stop()
        fabric.stop()


def test_a_producer_facing_a_full_queue_waits_for_room_instead_of_being_refused(ctx, db_url):
    GatedSink.gate.clear()
    GatedSink.down.clear()
    fabric = Fabric(ctx, db_url, producers=0, consumers=0, partitions=1, capacity=10,
                    heartbeat_ms=100, put_wait_ms=4000)
    fabric.start()
    consumer = gated_consumer(ctx, fabric)
    outcome: list[Any] = []
    try:
        with fabric.client() as client:
            client.send_batch([make_record({"n": n}) for n in range(10)])  # the queue is full
        wait_until(lambda: fabric.status()["partitions"][0]["inflight"] == 10, what="delivery")

        def send_more() -> None:
            with fabric.client() as late:
                outcome.append((late.send_batch([make_record({"n": n}) for n in range(10, 15)]),
                                late.stats["backpressure_retries"]))

        sender = threading.Thread(target=send_more)
        sender.start()
        wait_until(lambda: fabric.status()["waiting_puts"] == 1, what="the PUT parked")
        GatedSink.gate.set()  # the consumer stores and acks: room for the parked PUT
        sender.join(10)
        acks, retries = outcome[0]
        assert len(acks) == 5 and retries == 0
        wait_until(lambda: len(stored_rows(db_url)) == 15, what="all 15 stored")
        assert fabric.status()["counters"]["refused"] == 0
    finally:
        GatedSink.gate.set()
        consumer.stop()
        fabric.stop()


def test_a_consumer_waiting_for_the_writer_turn_stores_what_piled_up_in_one_transaction(
        ctx, db_url):
    import fcntl

    fabric = Fabric(ctx, db_url, producers=0, consumers=1, partitions=1, heartbeat_ms=100,
                    max_batch=2)
    fabric.start()
    other = open(db_url.removeprefix("sqlite:///") + ".zmqlab-lock", "a+b")  # another writer
    try:
        consumer = fabric.consumers["9090"]
        with fabric.client() as client:
            client.send_batch([make_record({"n": -1})])  # the consumer opens its database
            wait_until(lambda: consumer.stats["acked"] == 1, what="the first record stored")
            fcntl.flock(other, fcntl.LOCK_EX)
            for n in range(7):  # one batch at once, then full batches of 2 while it waits
                client.send_batch([make_record({"n": n})])
        wait_until(lambda: consumer.stats["received"] == 8, what="all 7 at the consumer")
        fcntl.flock(other, fcntl.LOCK_UN)
        wait_until(lambda: len(stored_rows(db_url)) == 8, what="all 7 stored")
        later = [r for r in stored_rows(db_url) if r["payload"]["n"] >= 0]
        assert len({row["stored_at"] for row in later}) == 1  # in one transaction
    finally:
        other.close()
        fabric.stop()


def test_a_consumer_reports_a_database_it_cannot_open_at_start_before_any_record(ctx,
                                                                                 tmp_path):
    fabric = Fabric(ctx, f"sqlite:///{tmp_path}/no/such/dir/zmqlab.db", producers=0,
                    consumers=1, partitions=1, heartbeat_ms=100)
    fabric.start()
    try:
        consumer = fabric.consumers["9090"]
        wait_until(lambda: consumer.snapshot()["sink_error"], what="the database error")
        assert "unable to open database file" in consumer.snapshot()["sink_error"]
        assert consumer.stats["received"] == 0
    finally:
        fabric.stop()


def test_while_the_database_is_down_records_stay_queued_and_flow_when_it_returns(ctx, db_url):
    fabric, consumer = gated_fabric(ctx, db_url, 2, gate_open=True, down=True,
                                    retry_initial_s=0.01, retry_max_s=0.05)
    try:
        with fabric.client() as client:
            client.send_batch([make_record({"n": n}) for n in range(20)])
        wait_until(lambda: consumer.stats["sink_errors"] >= 1, what="the sink error")
        snap = fabric.status()
        assert sum(p["depth"] for p in snap["partitions"]) == 20
        assert sum(p["acked"] for p in snap["partitions"]) == 0
        assert consumer.sink_error == "database is down (test)"
        GatedSink.down.clear()
        wait_until(lambda: len(stored_rows(db_url)) == 20, what="records stored after recovery")
        wait_until(lambda: queue_empty(fabric), what="acks after recovery")
        assert consumer.sink_error is None
    finally:
        GatedSink.down.clear()
        consumer.stop()
        fabric.stop()


def test_lazy_pirate_retries_a_lost_reply_with_the_same_ids(ctx, endpoint):
    """Given a server that swallows the first request, the client reopens its socket and sends
    the same record ids again, so the broker can answer the retry as a duplicate."""
    address = endpoint("flaky")
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(address)
    seen: list[list[Any]] = []

    def serve() -> None:
        replies = 0
        while replies < 2:
            frames = recv(server, 10)
            message = proto.decode(frames[2:])
            if message.command is Command.HELLO:
                server.send_multipart([*frames[:2], *proto.encode(Command.WELCOME,
                                                                  {"partitions": 1})])
                continue
            seen.append(message.header["ids"])
            if len(seen) == 1:
                continue  # lost reply
            server.send_multipart([*frames[:2], *proto.encode(
                Command.ACK, {"acks": [], "dups": [[0, 0, 0]], "errors": []})])
            replies += 2

    thread = threading.Thread(target=serve)
    thread.start()
    with Producer(address, context=ctx, timeout_ms=200, retries=2) as client:
        ack = client.send({"a": 1})
        assert client.stats["reconnects"] == 1
    thread.join(10)
    server.close(0)
    assert seen[0] == seen[1] and ack.duplicate and ack.id == seen[0][0]


def test_a_silent_endpoint_ends_in_a_clear_error_after_bounded_retries(ctx, endpoint):
    from zmqlab.errors import BrokerUnavailable

    sink = ctx.socket(zmq.ROUTER)
    sink.bind(endpoint("silent"))
    address = sink.getsockopt_string(zmq.LAST_ENDPOINT)
    with Producer(address, context=ctx, timeout_ms=50, retries=2) as client:
        try:
            client.send({"a": 1})
        except BrokerUnavailable as exc:
            assert "after 3 tries of 50 ms" in str(exc)
        else:
            raise AssertionError("expected BrokerUnavailable")
    sink.close(0)


def test_consumers_and_producer_services_register_again_after_a_broker_restart(ctx, db_url):
    fabric = Fabric(ctx, db_url, producers=1, consumers=2, heartbeat_ms=100).start()
    try:
        wait_until(lambda: all(c.registered for c in fabric.consumers.values()))
        with fabric.client("8080", timeout_ms=500, retries=10) as client:
            client.send_batch([make_record({"n": n}) for n in range(10)])
            wait_until(lambda: len(stored_rows(db_url)) == 10, what="first records")
            fabric.broker.stop()
            from zmqlab import Broker

            fabric.broker = Broker(fabric.broker_config, context=ctx)
            fabric.broker.start()
            client.send_batch([make_record({"n": n}) for n in range(10, 20)])
        wait_until(lambda: len(stored_rows(db_url)) == 20, what="records after the restart")
        assert all(c.stats["registrations"] >= 2 for c in fabric.consumers.values())
        wait_until(lambda: len(fabric.status()["consumers"]) == 2, what="both consumers back")
    finally:
        fabric.stop()


def test_the_dedupe_window_is_bounded(make_broker):
    broker, _ = make_broker(partitions=1, dedupe_window=2)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    put(broker, b"{}", b"{}", b"{}", b"{}", ids=["a", "b", "c", "d"])
    to(broker, "9090")
    epoch = broker.partitions[0].epoch
    for first in (0, 2):  # two ACKs of two: each fills a generation of the window
        consumer_says(broker, "9090", Command.ACK, {"acks": [
            {"partition": 0, "epoch": epoch, "offsets": [[first, 2]]}]})
    assert not broker.dedupe.held
    assert broker.dedupe.remembered <= 2 * 2
    assert put(broker, b"{}", ids=["c"]).header["dups"] == [[0, 0, 2]]
    assert put(broker, b"{}", ids=["a"]).header["dups"] == []  # outside the window


def test_a_stopping_broker_refuses_new_records_and_drains_what_it_holds(ctx, db_url):
    fabric, consumer = gated_fabric(ctx, db_url, 2, gate_open=False, down=False)
    try:
        with fabric.client(retries=0, deadline_s=0.2) as client:
            client.send_batch([make_record({"n": n}) for n in range(30)])
            wait_until(lambda: fabric.status()["partitions"][0]["inflight"] > 0, what="delivery")
            stopper = threading.Thread(target=fabric.broker.stop)
            stopper.start()
            wait_until(lambda: fabric.broker.stopping_until is not None, what="stopping")
            from zmqlab.errors import RecordsRefused

            try:
                client.send({"late": True})
            except RecordsRefused as exc:
                assert exc.code == "UNAVAILABLE" and "shutting down" in exc.reason
            else:
                raise AssertionError("a stopping broker accepted a record")
        assert fabric.broker.alive  # still draining: its records are not stored yet
        GatedSink.gate.set()
        stopper.join(15)
        assert not fabric.broker.alive
        assert len(stored_rows(db_url)) == 30
    finally:
        GatedSink.gate.set()
        consumer.stop()
        fabric.stop()


def test_a_transaction_of_many_batches_rings_the_socket_thread_once(ctx, db_url):
    """One ACK message per transaction, not per partition batch in it: with 24 partitions a
    ring per batch had cost the consumers 9 % more CPU and the broker 5 %."""
    from zmqlab.config import ConsumerConfig
    from zmqlab.consumer import Consumer, Result, _Progress
    from zmqlab.store import Batch, Records

    consumer = Consumer(ConsumerConfig(name="9090", db_url=db_url), context=ctx)
    sink = Sink.open(db_url, "9090")
    here, there = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    here.bind("inproc://bell-test")
    there.connect("inproc://bell-test")
    try:
        pending = [_Progress(Batch(n, 1, records=Records(
            [0, 1], [f"b{n}-0", f"b{n}-1"], [None, None], ["8080"] * 2, [1_700_000_000] * 2,
            [1, 1], [b"{}", b"{}"]))) for n in range(8)]
        _, left = consumer._attempt(sink, pending, there)
        assert left == []
        assert here.poll(1000) and here.recv() == b""
        assert not here.poll(50)  # one ring for the eight batches
        results = [consumer._results.get_nowait() for _ in range(consumer._results.qsize())]
        assert [r.batch.partition for r in results if isinstance(r, Result)] == list(range(8))
    finally:
        here.close(0)
        there.close(0)
        sink.close()
