"""Test helpers: bounded receives and waits, free ports, an in-process fabric, shared
scenarios, and a broker driven through its handlers (the broker harness)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from zmqlab import protocol as proto
from zmqlab.broker import Broker, Side
from zmqlab.config import BrokerConfig
from zmqlab.protocol import Command


def recv(sock: zmq.Socket[Any], timeout_s: float = 5.0) -> list[bytes]:
    """Receive one multipart message or fail the test; no receive may hang."""
    if not sock.poll(int(timeout_s * 1000)):
        raise AssertionError(f"nothing received within {timeout_s} s")
    return sock.recv_multipart()


def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition",
               interval_s: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout_s``. Waits on a condition,
    never for a fixed time."""
    pause = threading.Event()
    deadline = _now() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if _now() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        pause.wait(interval_s)


def _now() -> float:
    return time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """A base port with ``count`` consecutive free ports (for topologies with port ranges)."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65000:
            continue
        sockets = []
        try:
            for i in range(count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no block of free ports")



class Fabric:
    """Broker, producer services and consumers as threads in one context over ``inproc://``."""

    def __init__(self, ctx: zmq.Context[Any], db_url: str, *, producers: int = 3,
                 consumers: int = 3, partitions: int = 6, capacity: int = 10_000,
                 heartbeat_ms: int = 200, credit: int = 500, **broker_options: Any) -> None:
        from zmqlab import Broker, BrokerConfig

        tag = uuid.uuid4().hex[:8]
        self.ctx = ctx
        self.db_url = db_url
        self.heartbeat_ms = heartbeat_ms
        self.credit = credit
        self.frontend = f"inproc://front-{tag}"
        self.backend = f"inproc://back-{tag}"
        self.broker_config = BrokerConfig(frontend=self.frontend, backend=self.backend,
                                          partitions=partitions, capacity=capacity,
                                          heartbeat_ms=heartbeat_ms, **broker_options)
        self.broker = Broker(self.broker_config, context=ctx)
        self.producers: dict[str, Any] = {}
        self.consumers: dict[str, Any] = {}
        self.ingress: dict[str, str] = {}
        self._tag = tag
        self._producer_count = producers
        self._consumer_count = consumers

    def start(self) -> Fabric:
        self.broker.start()
        for i in range(self._consumer_count):
            self.add_consumer(str(9090 + i))
        for i in range(self._producer_count):
            self.add_producer(str(8080 + i))
        return self

    def add_producer(self, name: str) -> Any:
        from zmqlab import ProducerConfig, ProducerService

        ingress = f"inproc://ingress-{name}-{self._tag}"
        service = ProducerService(ProducerConfig(name=name, broker=self.frontend, ingress=ingress,
                                                 heartbeat_ms=self.heartbeat_ms),
                                  context=self.ctx)
        service.start()
        self.producers[name] = service
        self.ingress[name] = ingress
        return service

    def add_consumer(self, name: str, **options: Any) -> Any:
        from zmqlab import Consumer, ConsumerConfig

        options.setdefault("credit", self.credit)
        consumer = Consumer(ConsumerConfig(name=name, broker=self.backend, db_url=self.db_url,
                                           heartbeat_ms=self.heartbeat_ms, **options),
                            context=self.ctx)
        consumer.start()
        self.consumers[name] = consumer
        return consumer

    def client(self, producer: str | None = None, **options: Any) -> Any:
        from zmqlab import Producer

        target = self.frontend if producer is None else self.ingress[producer]
        options.setdefault("timeout_ms", 5000)
        return Producer(target, context=self.ctx, **options)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            result: dict[str, Any] = c.status()
            return result

    def stop(self) -> None:
        for node in [*self.producers.values(), *self.consumers.values(), self.broker]:
            if node.alive:
                node.stop()


# -- scenarios and checks shared by the integration tests -------------------------------------
def stored_rows(db_url: str) -> list[Any]:
    """Every row of the records table."""
    from sqlalchemy import select

    from zmqlab.store import RECORDS, make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(RECORDS)).mappings())
    finally:
        engine.dispose()


def run_seed_scenario(ctx: zmq.Context[Any], db_url: str, per_producer: int = 200) -> None:
    """Given 3 producers, a broker with 6 partitions and 3 consumers,
    when every producer's clients send records concurrently,
    then every record is acknowledged, stored exactly once, and gone from the queue."""
    from zmqlab.producer import make_record

    fabric = Fabric(ctx, db_url).start()
    try:
        wait_until(lambda: all(c.registered for c in fabric.consumers.values()), what="consumers")
        acks: dict[str, Any] = {}
        failures: list[BaseException] = []

        def produce(name: str) -> None:
            try:
                with fabric.client(name) as client:
                    for start in range(0, per_producer, 25):
                        batch = [make_record({"producer": name, "n": n},
                                             key=None if n % 2 else f"k{n % 7}")
                                 for n in range(start, start + 25)]
                        for ack in client.send_batch(batch):
                            acks[ack.id] = ack
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=produce, args=(n,)) for n in fabric.producers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures
        total = 3 * per_producer
        assert len(acks) == total and not any(a.duplicate for a in acks.values())

        wait_until(lambda: len(stored_rows(db_url)) >= total, what="all records stored")
        rows = stored_rows(db_url)
        assert sorted(r["id"] for r in rows) == sorted(acks)  # each exactly once
        for row in rows:
            ack = acks[row["id"]]
            assert (row["partition"], row["offset"]) == (ack.partition, ack.offset)
            assert row["producer"] == row["payload"]["producer"]
            assert row["consumer"] in fabric.consumers
            assert row["attempt"] == 1
        # Ownership: every partition's rows were stored by its round-robin owner.
        owners = {p: str(9090 + p % 3) for p in range(6)}
        assert all(row["consumer"] == owners[row["partition"]] for row in rows)

        def queue_empty() -> bool:
            snap = fabric.status()
            return all(p["depth"] == 0 for p in snap["partitions"]) and snap["held_ids"] == 0

        wait_until(queue_empty, what="the queue to empty")
        snap = fabric.status()
        assert sum(p["acked"] for p in snap["partitions"]) == total
        assert {p["name"] for p in snap["producers"]} == set(fabric.producers)
    finally:
        fabric.stop()


# -- a broker driven through its handlers, with fake time and no sockets ------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_broker(**options: Any) -> tuple[Broker, Clock]:
    """A broker on fake time (``clock.now``), driven through its handlers: no sockets."""
    clock = Clock()
    options = {"heartbeat_ms": 1000, "liveness": 3, **options}
    config = BrokerConfig(frontend="inproc://f", backend="inproc://b", **options)
    return Broker(config, clock=clock), clock


def producer_says(broker: Broker, command: Command, header: dict[str, Any] | None = None,
                  payloads: list[bytes] | None = None, who: bytes = b"req-1") -> proto.Message:
    broker.outbox.clear()
    broker.handle_frontend([who, b"", *proto.encode(command, header, payloads or [])],
                           broker.clock())
    (side, frames), = broker.outbox
    assert side is Side.FRONTEND and frames[0] == who
    broker.outbox.clear()
    return proto.decode(frames[2:])


@dataclass
class ConsumerPeer:
    """What a consumer knows of its session: the token, its own count, the broker's last."""

    session: str | None = None
    seq: int = 0
    seen: int = 0


_PEERS: weakref.WeakKeyDictionary[Broker, dict[str, ConsumerPeer]] = weakref.WeakKeyDictionary()


def peer(broker: Broker, name: str) -> ConsumerPeer:
    return _PEERS.setdefault(broker, {}).setdefault(name, ConsumerPeer())


def consumer_says(broker: Broker, name: str, command: Command,
                  header: dict[str, Any] | None = None, *,
                  as_is: bool = False) -> list[proto.Message]:
    """Consumer ``name`` sends ``command``; what the broker then has for it, delivered.

    Like a real consumer it puts its session, its next ``seq`` and the last broker ``seq`` it
    saw in every message after HELLO; ``as_is`` sends the header untouched."""
    header = dict(header or {})
    me = peer(broker, name)
    if command is not Command.HELLO and not as_is and me.session is not None:
        me.seq += 1
        header.update(session=me.session, seq=me.seq, seen=me.seen)
    broker.handle_backend([name.encode(), b"", *proto.encode(command, header)], broker.clock())
    return to(broker, name)


def to(broker: Broker, name: str) -> list[proto.Message]:
    """Messages the broker queued for consumer ``name`` (after delivering), removed; a
    WELCOME starts the consumer's session, numbered messages of it count as seen."""
    broker.deliver(broker.clock())
    messages = _take(broker, Side.BACKEND, name.encode())
    me = peer(broker, name)
    for message in messages:
        if message.command is Command.WELCOME:
            me.session, me.seq, me.seen = message.header["session"], 0, 0
        elif message.header.get("session") == me.session and \
                message.header.get("seq") == me.seen + 1:  # after a gap it sees no further
            me.seen += 1
    return messages


def _take(broker: Broker, side: Side, identity: bytes) -> list[proto.Message]:
    """The messages in the broker's outbox for ``identity`` on ``side``, removed from it."""
    mine = [f for s, f in broker.outbox if s is side and f[0] == identity]
    broker.outbox = [(s, f) for s, f in broker.outbox if not (s is side and f[0] == identity)]
    return [proto.decode(f[2:]) for f in mine]


def put(broker: Broker, *payloads: bytes, key: str | None = None, ids: list[str] | None = None,
        who: bytes = b"req-1") -> proto.Message:
    ids = ids or [f"id-{i}-{len(broker.dedupe.held)}" for i in range(len(payloads))]
    metas = [[i, key, 1_000_000, len(p)] for i, p in zip(ids, payloads, strict=True)]
    return producer_says(broker, Command.PUT, columns(metas), proto.join_payloads(payloads),
                         who=who)


def columns(metas: list[list[Any]]) -> dict[str, Any]:
    """A PUT header from rows [id, key, created_us, size] (the wire sends columns)."""
    return {name: [m[k] for m in metas]
            for k, name in enumerate(("ids", "keys", "created_us", "sizes"))}


def records_of(message: proto.Message) -> list[list[Any]]:
    """Every record in a RECORDS message, over its partitions' batches, as a row
    [offset, id, key, producer, created_us, attempt, size] (the wire sends columns)."""
    return [rows for b in message.header["batches"] for rows in batch_rows(b)]


def batch_rows(batch: dict[str, Any]) -> list[list[Any]]:
    offsets = [o for first, count in batch["offsets"] for o in range(first, first + count)]
    columns = [proto.column(batch, c, len(offsets))
               for c in ("ids", "keys", "producers", "created_us", "attempts", "sizes")]
    return [list(row) for row in zip(offsets, *columns, strict=True)]


def placed(reply: proto.Message) -> list[list[Any]]:
    """The ACK of a one-part PUT, one [index, partition, offset, duplicate] per record."""
    out = [[index + k, partition, first + k, False]
           for index, count, partition, first in reply.header["acks"] for k in range(count)]
    out += [[index, partition, offset, True] for index, partition, offset in reply.header["dups"]]
    return sorted(out)


def only_batch(message: proto.Message) -> dict[str, Any]:
    (batch,) = message.header["batches"]
    return batch  # type: ignore[no-any-return]


def ack(number: int, epoch: int, offsets: list[int]) -> dict[str, Any]:
    return {"acks": [{"partition": number, "epoch": epoch, "offsets": [[o, 1] for o in offsets]}]}


def hello(broker: Broker, who: bytes = b"req-1", name: str = "8080") -> None:
    assert producer_says(broker, Command.HELLO, {"role": "producer", "name": name},
                         who=who).command is Command.WELCOME




def replies_to(broker: Broker, who: bytes) -> list[proto.Message]:
    """Replies the broker queued for producer ``who`` (removed from the outbox)."""
    return _take(broker, Side.FRONTEND, who)


def put_parked(broker: Broker, *payloads: bytes, who: bytes = b"req-1",
               key: str | None = None) -> None:
    ids = [f"{who.decode()}-{i}-{broker.counters['waited']}" for i in range(len(payloads))]
    metas = [[i, key, 1_000_000, len(p)] for i, p in zip(ids, payloads, strict=True)]
    broker.handle_frontend([who, b"", *proto.encode(Command.PUT, columns(metas),
                                                     proto.join_payloads(list(payloads)))],
                           broker.clock())
    assert replies_to(broker, who) == []  # parked: the REQ producer waits for its reply


def full_broker_with_a_consumer(make: Callable[..., tuple[Broker, Clock]],
                                **options: Any) -> tuple[Broker, Clock, dict[str, Any]]:
    """One partition of capacity 2, full, its records held by consumer 9090: (broker, clock,
    the batch the consumer holds)."""
    broker, clock = make(partitions=1, capacity=2, **options)
    hello(broker)
    hello(broker, b"req-2", "8081")
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    put(broker, b"{}", b"{}")
    (records,) = to(broker, "9090")
    return broker, clock, only_batch(records)


def depth_of(value: Any) -> int:
    """How deep JSON arrays and objects nest in ``value`` (iterative: no recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, list | dict):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in (item.values() if isinstance(item, dict)
                                                 else item))
    return deepest
