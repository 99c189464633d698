"""Test helpers: bounded receives and waits, free ports, an in-process fabric."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq


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
