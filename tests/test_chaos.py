"""Chaos end to end: real processes over TCP loopback, SIGKILL a consumer and a producer
service under a steady load from three producers, restart both, and check that every record
acknowledged to a client is stored exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port_block, wait_until
from sqlalchemy import func, select

from zmqlab.errors import ZmqlabError
from zmqlab.producer import Producer, make_record
from zmqlab.store import DEAD_LETTERS, RECORDS, make_engine
from zmqlab.topology import Supervisor, Topology, query_status

pytestmark = pytest.mark.e2e


class Load:
    """One client thread per producer service, sending keyed batches until told to stop (or,
    as a bound, until ``limit`` records each: the test stops it long before)."""

    def __init__(self, endpoints: list[str], limit: int) -> None:
        self.acked: dict[str, Any] = {}
        self.failed_batches = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.limit = limit
        self.threads = [threading.Thread(target=self._run, args=(e, i), daemon=True)
                        for i, e in enumerate(endpoints)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, endpoint: str, n: int) -> None:
        sent = 0
        with Producer(endpoint, timeout_ms=400, retries=25, deadline_s=30) as client:
            while not self.stop.is_set() and sent < self.limit:
                batch = [make_record({"client": n, "i": sent + i}, key=f"k{(sent + i) % 17}")
                         for i in range(20)]
                sent += len(batch)
                try:
                    acks = client.send_batch(batch)
                except ZmqlabError:
                    with self.lock:
                        self.failed_batches += 1
                    continue
                with self.lock:
                    self.acked.update((a.id, a) for a in acks)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def join(self) -> None:
        for t in self.threads:
            t.join(120)


def test_kill_a_consumer_and_a_producer_under_load_then_restart_them(tmp_path: Path):
    base = free_port_block(10)
    db_url = f"sqlite:///{tmp_path / 'chaos.db'}"
    topology = Topology(frontend_port=base, backend_port=base + 1, producer_port=base + 2,
                        consumer_port=base + 5, db_url=db_url, heartbeat_ms=250,
                        log_level="info")
    supervisor = Supervisor(topology, log_dir=str(tmp_path / "logs"))
    supervisor.start()
    load = Load(topology.producer_endpoints(), limit=100_000)
    try:
        load.start()
        wait_until(lambda: load.count() >= 600, 60, "steady load")

        # A consumer dies holding records: the broker expires it and releases them.
        victim = supervisor.find("consumer", str(base + 6))
        consumer_argv = victim.argv
        supervisor.kill(victim)
        wait_until(lambda: len(query_status(topology.frontend)["consumers"]) == 2, 30,
                   "the dead consumer expired")
        mark = load.count()
        wait_until(lambda: load.count() >= mark + 600, 60, "progress with two consumers")

        # A producer service dies: its client retries (Lazy Pirate) until it is back.
        producer = supervisor.find("producer", str(base + 3))
        producer_argv = producer.argv
        supervisor.kill(producer)
        mark = load.count()
        wait_until(lambda: load.count() >= mark + 300, 60, "progress without one producer")

        supervisor.spawn("producer", str(base + 3), producer_argv)
        supervisor.spawn("consumer", str(base + 6), consumer_argv)
        wait_until(lambda: len(query_status(topology.frontend)["consumers"]) == 3, 30,
                   "the consumer back")
        mark = load.count()
        wait_until(lambda: load.count() >= mark + 600, 60, "progress with everything back")
        load.stop.set()  # the load runs until here: it must not run out before the kills
        load.join()
        assert load.failed_batches == 0
        acked = load.acked
        assert len(acked) >= 2100

        engine = make_engine(db_url)

        def count() -> int:
            with engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(RECORDS)).scalar_one())

        wait_until(lambda: count() >= len(acked), 60, "every acked record stored")
        with engine.connect() as conn:
            rows = conn.execute(select(RECORDS.c.id, RECORDS.c.partition, RECORDS.c.offset,
                                       RECORDS.c.key, RECORDS.c.payload)).all()
            ids = [r[0] for r in rows]
            redelivered = conn.execute(select(func.count()).select_from(RECORDS)
                                       .where(RECORDS.c.attempt > 1)).scalar_one()
            dead = conn.execute(select(func.count()).select_from(DEAD_LETTERS)).scalar_one()
        engine.dispose()
        assert len(ids) == len(set(ids)) == len(acked) and set(ids) == set(acked)
        assert dead == 0
        # Per key, a client's records sit in one partition in the order it sent them.
        by_key: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
        for _, partition, offset, key, payload in rows:
            by_key.setdefault((payload["client"], key), []).append(
                (payload["i"], partition, offset))
        for sequence in by_key.values():
            sequence.sort()
            assert len({p for _, p, _ in sequence}) == 1
            offsets = [o for _, _, o in sequence]
            assert offsets == sorted(offsets)
        snap = query_status(topology.frontend)
        assert snap["counters"]["expired"] >= 1 and snap["counters"]["released"] >= 1
        # Each released record was either stored by the new owner (attempt > 1 in the table)
        # or already committed by the killed consumer before it could ACK (then the new
        # owner's insert is a duplicate the primary key refused): at least one of the two.
        duplicates = sum(query_status(e)["duplicates"] for e in topology.consumer_endpoints())
        assert redelivered + duplicates >= 1
        # 0 duplicate rows. The primary key already rules out an id stored twice, so count
        # what it cannot see: a record stored twice under two ids (a retry that made a new id).
        copies = Counter((payload["client"], payload["i"]) for *_, payload in rows)
        assert [record for record, n in copies.items() if n > 1] == []
        wait_until(lambda: all(p["depth"] == 0 and p["inflight"] == 0 for p in
                               query_status(topology.frontend)["partitions"]), 30, "empty queue")
    finally:
        load.stop.set()
        load.join()
        codes = supervisor.stop()
    assert all(code == 0 for code in codes.values()), codes
