"""The reset loop (the done-when of the issue "Faults without loss"): a load through the seed
topology while the consumers' TCP connections to the broker's backend are reset every second.

ZeroMQ reconnects after a reset on its own and neither side hears of it; whatever sat in the
socket buffers is gone. Consumer sessions (docs/sessions.md) make both sides notice and start
over, so the load must still end with every acknowledged record stored exactly once and
nothing left queued or in flight.

The resets are ``ss -K`` (SOCK_DESTROY, which needs CAP_NET_ADMIN: root here and in CI) on
loopback only. Without that permission the test skips locally and fails in CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port_block, wait_until
from sqlalchemy import select

from zmqlab.store import RECORDS, make_engine
from zmqlab.topology import Supervisor, Topology, query_status

pytestmark = pytest.mark.e2e

ISSUE_RESET_S = 20.0  # how long the issue's done-when resets connections under load
# 8 s by default, CI included, keeps the whole test under ~25 s; ZMQLAB_RESET_LOOP_S=20 runs
# the issue's full length.
RESET_LOOP_S = float(os.environ.get("ZMQLAB_RESET_LOOP_S", "8"))
RESET_EVERY_S = 1.0
RATE = 500  # records/s over all load clients, so that the load lasts as long as the resets
RECORDS_SENT = int(RATE * RESET_LOOP_S)


def kill_connections(port: int) -> int:
    """Reset every loopback TCP connection to ``port`` (``ss -K``); how many it reset."""
    done = subprocess.run(["ss", "-K", "-H", "dst", "127.0.0.1", "dport", "=", str(port)],
                          capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    return sum(1 for line in done.stdout.splitlines() if line.strip())


def ss_kill_problem() -> str | None:
    """Why ``ss -K`` cannot reset connections here (None when it can): tried on a loopback
    connection of our own."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = server.accept()
            with accepted:
                try:
                    kill_connections(port)
                except (OSError, subprocess.SubprocessError) as exc:
                    return f"ss -K cannot run: {exc}"
                client.settimeout(5)
                try:
                    client.sendall(b"x")
                    client.recv(1)  # an open connection would wait here (for 5 s at most)
                except OSError:
                    return None  # reset: ss -K works
                return "ss -K did not reset a loopback connection (it needs CAP_NET_ADMIN)"


@pytest.fixture
def resets_allowed() -> None:
    problem = ss_kill_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the reset-loop test must run in CI: {problem}")
        pytest.skip(problem)


class ResetLoop:
    """A thread that resets the connections to ``port`` every ``RESET_EVERY_S`` for
    ``duration_s``; ``resets`` counts the connections it reset."""

    def __init__(self, port: int, duration_s: float) -> None:
        self.port = port
        self.duration_s = duration_s
        self.resets = 0
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rounds = round(self.duration_s / RESET_EVERY_S)
        while self.rounds < rounds and not self.stop.wait(RESET_EVERY_S):  # the fault's pace
            self.resets += kill_connections(self.port)
            self.rounds += 1

    def __enter__(self) -> ResetLoop:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def tail_logs(log_dir: Path, lines: int = 15) -> str:
    """The last lines of every node's log, for a failure message."""
    out = []
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


def test_resets_of_every_consumer_connection_under_load_lose_and_duplicate_nothing(
        tmp_path: Path, resets_allowed: None) -> None:
    # Given the seed topology on free ports
    base = free_port_block(8)
    db_url = f"sqlite:///{tmp_path / 'reset.db'}"
    topology = Topology(frontend_port=base, backend_port=base + 1, producer_port=base + 2,
                        consumer_port=base + 5, db_url=db_url, heartbeat_ms=250,
                        log_level="info")
    log_dir = tmp_path / "logs"
    supervisor = Supervisor(topology, log_dir=str(log_dir))
    supervisor.start()
    codes: dict[str, int] = {}
    try:
        # When a paced load runs while every consumer's connection to the backend is reset
        # every second
        with ResetLoop(topology.backend_port, RESET_LOOP_S) as resets:
            load = subprocess.run(
                [sys.executable, "-m", "zmqlab", "load",
                 "--to", ",".join(topology.producer_endpoints()),
                 "--records", str(RECORDS_SENT), "--rate", str(RATE), "--keys", "16",
                 "--deadline", str(RESET_LOOP_S + 30), "--verify", db_url,
                 "--verify-timeout", "20", "--json"],
                capture_output=True, text=True, timeout=RESET_LOOP_S + 90,
                stdin=subprocess.DEVNULL)
        report: dict[str, Any] = json.loads(load.stdout) if load.stdout.strip() else {}

        # Then the loop did reset connections (else this test proves nothing)
        assert resets.resets >= resets.rounds // 2 > 0, (resets.resets, resets.rounds)
        # and the load succeeded: every record acknowledged, each acknowledged one stored once
        assert load.returncode == 0, (load.stderr[-2000:], report, tail_logs(log_dir))
        assert report["acked"] == report["persisted"] == RECORDS_SENT
        assert report["lost"] == report["duplicates"] == report["dead_lettered"] == 0
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(RECORDS.c.id, RECORDS.c.payload)).all()
        finally:
            engine.dispose()
        copies = Counter((row.payload["client"], row.payload["seq"]) for row in rows)
        assert len(rows) == len(copies) == RECORDS_SENT  # no record stored under two ids
        # and nothing is left queued or in flight at the broker
        wait_until(lambda: all(p["depth"] == 0 and p["inflight"] == 0
                               for p in query_status(topology.frontend)["partitions"]),
                   10, "an empty queue with nothing in flight")
    finally:
        codes = supervisor.stop()
    assert all(code == 0 for code in codes.values()), (codes, tail_logs(log_dir))
