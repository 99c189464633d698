"""Durability end to end: a real ``zmqlab up`` (durable broker, supervised nodes) on free ports,
``zmqlab load --verify`` running through it, and nodes killed with SIGKILL: the broker, a
consumer, a producer service, ``up`` itself, a random node every 2 s, a broker holding a
backlog. Whatever was acknowledged must end up in ``records`` exactly once.

Every process is started here and stopped by PID (``up``'s nodes by the PIDs its status
endpoint reported, checked against this test's ports first). Waits poll a condition against
a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from sqlalchemy import select

from zmqlab.errors import ZmqlabError
from zmqlab.loadgen import verify
from zmqlab.store import RECORDS, make_engine
from zmqlab.topology import Topology, query_status, query_supervisor

pytestmark = pytest.mark.e2e
ZMQLAB = [sys.executable, "-m", "zmqlab"]

ISSUE_KILL_LOOP_S = 30.0  # how long the issue kills a random node every 2 s under load
# 14 s by default, CI included (7 kills: each of the 7 nodes once, in a random order), keeps
# this file near a minute; ZMQLAB_KILL_LOOP_S=30 runs the issue's full length.
KILL_LOOP_S = float(os.environ.get("ZMQLAB_KILL_LOOP_S", "14"))
KILL_EVERY_S = 2.0
# The issue's backlog; ZMQLAB_BACKLOG_RECORDS makes it smaller on a slow machine.
BACKLOG_RECORDS = int(os.environ.get("ZMQLAB_BACKLOG_RECORDS", "100000"))
HEARTBEAT_MS = 300  # so that a killed node is noticed within a second


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> int:
    """A base port with ``count`` free ports after it, below the kernel's ephemeral range.

    Why not ``helpers.free_port_block``: its ports are ephemeral ones, and a node that up
    restarts binds its port again after its death; meanwhile any outgoing connection (this
    test's status queries, the load's clients) may have taken it as its source port.
    """
    rng = random.Random()
    top = min(ephemeral_low(), 32768) - count
    for _ in range(200):
        base = rng.randrange(20000, top)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a node binds
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no block of free ports below the ephemeral range")


def alive(pid: int) -> bool:
    """The process runs (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone (or not ours to read)
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone (or not ours to read)
        return ""


class Up:
    """``zmqlab up`` as a process on free ports, durable, its output in files."""

    def __init__(self, tmp_path: Path, name: str, *, data_dir: Path, db_url: str,
                 consumers: int = 3, extra: tuple[str, ...] = ()) -> None:
        base = free_ports(12)
        self.topology = Topology(frontend_port=base, backend_port=base + 1,
                                 producer_port=base + 3, consumer_port=base + 6,
                                 consumers=consumers, db_url=db_url)
        self.status = f"tcp://127.0.0.1:{base + 2}"
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        self.pids: set[int] = set()  # every node PID the status endpoint reported
        t = self.topology
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [*ZMQLAB, "up", "--frontend-port", str(t.frontend_port),
                 "--backend-port", str(t.backend_port), "--status-port", str(base + 2),
                 "--producer-port", str(t.producer_port), "--consumer-port",
                 str(t.consumer_port), "--consumers", str(consumers),
                 "--data-dir", str(data_dir), "--db", db_url, "--heartbeat-ms",
                 str(HEARTBEAT_MS), "--log-level", "info", *extra],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 60) -> bool:
        """True once up is ready; False when it could not start because a port was taken
        after ``free_ports`` chose it (by another test, say)."""
        wait_until(lambda: self.process.poll() is not None or "ready:" in self.out.read_text(),
                   timeout_s, "zmqlab up to be ready")
        if self.process.poll() is not None and "Address already in use" in self.err.read_text():
            return False
        assert self.process.poll() is None, self.logs()
        self.nodes()
        return True

    def nodes(self) -> dict[tuple[str, str], dict[str, Any]]:
        """What up's status endpoint says of each node ({} when it does not answer)."""
        snap = query_supervisor(self.status, timeout_ms=1000)
        nodes = {(n["role"], n["name"]): n for n in (snap or {}).get("nodes", [])}
        self.pids.update(n["pid"] for n in nodes.values())
        return nodes

    def kill(self, role: str, name: str) -> int:
        """SIGKILL one node; its PID."""
        pid: int = self.nodes()[role, name]["pid"]
        assert self.ours(pid)
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_running(self, role: str, name: str, restarts: int, timeout_s: float = 30) -> None:
        def back() -> bool:
            node = self.nodes().get((role, name))
            return bool(node and node["state"] == "running" and node["restarts"] >= restarts)

        wait_until(back, timeout_s, f"{role} {name} restarted {restarts} time(s)")

    def broker(self, timeout_ms: int = 1000) -> dict[str, Any] | None:
        try:
            return query_status(self.topology.frontend, timeout_ms=timeout_ms)
        except ZmqlabError:
            return None

    def appended(self) -> int:
        snap = self.broker()
        return sum(p["appended"] for p in snap["partitions"]) if snap else 0

    def ours(self, pid: int) -> bool:
        """``pid`` runs a node of this topology (so a reused PID is never signalled)."""
        line = cmdline(pid)
        return "zmqlab" in line and any(f":{port}" in line for port in (
            self.topology.frontend_port, self.topology.backend_port))

    def leftovers(self) -> list[int]:
        """Every live process running a node of this topology."""
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        return [pid for pid in pids if pid != self.process.pid and alive(pid) and self.ours(pid)]

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in self.pids | set(self.leftovers()):
            if alive(pid) and self.ours(pid):
                os.kill(pid, signal.SIGKILL)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(self.err.read_text(errors="replace").splitlines()[-lines:])


class Load:
    """``zmqlab load --verify`` as a process through ``up``'s producer services."""

    def __init__(self, up: Up, records: int, rate: float, *, verify_db: bool = True,
                 keys: int = 16) -> None:
        self.up = up
        self.records = records
        deadline = records / rate + 60 if rate else 60
        args = [*ZMQLAB, "load", "--to", ",".join(up.topology.producer_endpoints()),
                "--records", str(records), "--rate", str(rate), "--clients", "6",
                "--keys", str(keys), "--deadline", str(deadline),
                # A node comes back within seconds: a request waits for it, resent to the
                # same producer service, rather than fail over after three tries.
                "--timeout-ms", "2000", "--retries", "8", "--json"]
        if verify_db:
            args += ["--verify", up.topology.db_url, "--verify-timeout", "60"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, stdin=subprocess.DEVNULL)
        self.timeout_s = deadline + 120

    def report(self) -> dict[str, Any]:
        """The load's report; it must have exited 0 (all acknowledged, none lost or doubled)."""
        out, err = self.process.communicate(timeout=self.timeout_s)
        report: dict[str, Any] = json.loads(out) if out.strip() else {}
        assert self.process.returncode == 0, (err[-2000:], report, self.up.logs())
        return report

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Any]]:
    """What a test starts (Up, Load); whatever is still running is killed by PID afterwards."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.cleanup()


def start_up(started: list[Any], tmp_path: Path, name: str = "up", **options: Any) -> Up:
    """``zmqlab up`` on free ports, ready; on new ports when one was taken meanwhile."""
    options.setdefault("data_dir", tmp_path / "data")
    options.setdefault("db_url", f"sqlite:///{tmp_path / 'records.db'}")
    for attempt in range(3):
        up = Up(tmp_path, name if attempt == 0 else f"{name}-{attempt}", **options)
        started.append(up)
        if up.wait_ready():
            return up
    raise AssertionError(f"zmqlab up found a port taken three times: {up.logs()}")


def start_load(started: list[Any], up: Up, records: int, rate: float, **options: Any) -> Load:
    load = Load(up, records, rate, **options)
    started.append(load)
    return load


def assert_stored_once(report: dict[str, Any], db_url: str, records: int) -> None:
    """Every record acknowledged and stored exactly once: by id (the report), and by content
    (no record stored twice under two ids)."""
    assert report["acked"] == report["persisted"] == records, report
    assert report["lost"] == report["duplicates"] == report["dead_lettered"] == 0, report
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(RECORDS.c.payload).where(
                RECORDS.c.id.startswith(report["run_id"] + "-"))).all()
    finally:
        engine.dispose()
    copies = Counter((row.payload["client"], row.payload["seq"]) for row in rows)
    assert len(rows) == len(copies) == records


def assert_nothing_in_flight(up: Up) -> None:
    def settled() -> bool:
        snap = up.broker()
        return bool(snap and all(p["depth"] == 0 and p["inflight"] == 0
                                 for p in snap["partitions"]))

    wait_until(settled, 30, "an empty queue with nothing in flight")


def producer_backlog(up: Up) -> int:
    """Records the producer services hold for the broker (waiting or sent, not answered)."""
    total = 0
    for endpoint in up.topology.producer_endpoints():
        try:
            snap = query_status(endpoint, timeout_ms=500)
        except ZmqlabError:
            continue
        total += snap["pending"] + snap["inflight"]
    return total


def test_a_broker_killed_mid_load_is_restarted_and_loses_nothing(started, tmp_path):
    # Given a durable `zmqlab up` and a paced load with --verify running through it
    up = start_up(started, tmp_path)
    load = start_load(started, up, records=12_000, rate=3000)
    wait_until(lambda: up.appended() >= 3000, 30, "the load under way")
    # When the broker is killed with SIGKILL
    up.kill("broker", "broker")
    # Then the producer services hold what their clients send meanwhile
    held = wait_until(lambda: producer_backlog(up), 10, "a backlog at the producer services")
    # and up restarts the broker, whose log has everything it acknowledged
    up.wait_running("broker", "broker", restarts=1)
    # and the load ends with every acknowledged record stored exactly once
    report = load.report()
    assert_stored_once(report, up.topology.db_url, 12_000)
    assert_nothing_in_flight(up)
    # and the producer services delivered their backlog themselves: they never gave a
    # request up as UNAVAILABLE, and hold nothing now
    assert held > 0
    for endpoint in up.topology.producer_endpoints():
        stats = query_status(endpoint)
        assert stats["unavailable"] == 0 and stats["pending"] == stats["inflight"] == 0, stats
    nodes = up.nodes()
    assert nodes["broker", "broker"]["last_exit"] == -signal.SIGKILL
    assert sum(n["restarts"] for n in nodes.values()) == 1  # nothing else was touched
    assert up.stop() == 0, up.logs()


def test_a_consumer_and_a_producer_service_killed_mid_load_come_back(started, tmp_path):
    # Given a durable `zmqlab up` and a paced load with --verify running through it
    up = start_up(started, tmp_path)
    load = start_load(started, up, records=12_000, rate=3000)
    consumer, producer = str(up.topology.consumer_port + 1), str(up.topology.producer_port + 1)
    wait_until(lambda: up.appended() >= 2000, 30, "the load under way")
    # When a consumer is killed with SIGKILL, and then a producer service
    up.kill("consumer", consumer)
    up.wait_running("consumer", consumer, restarts=1)
    mark = up.appended()
    wait_until(lambda: up.appended() >= mark + 1000, 30, "progress after the consumer kill")
    up.kill("producer", producer)
    # Then up restarts each of them
    up.wait_running("producer", producer, restarts=1)
    # and the load ends with every acknowledged record stored exactly once
    report = load.report()
    assert_stored_once(report, up.topology.db_url, 12_000)
    assert_nothing_in_flight(up)
    nodes = up.nodes()
    assert {k: n["restarts"] for k, n in nodes.items() if n["restarts"]} == {
        ("consumer", consumer): 1, ("producer", producer): 1}
    # and the restarted consumer registered again and took its share of partitions
    snap = up.broker()
    assert snap is not None and consumer in {c["name"] for c in snap["consumers"]}
    assert up.stop() == 0, up.logs()


def test_killing_up_with_sigkill_takes_every_node_with_it(started, tmp_path):
    # Given a durable `zmqlab up` with a load running through it
    up = start_up(started, tmp_path)
    load = start_load(started, up, records=50_000, rate=2000, verify_db=False)
    wait_until(lambda: up.appended() >= 1000, 30, "the load under way")
    pids = [n["pid"] for n in up.nodes().values()]
    assert len(pids) == 7 and all(alive(pid) for pid in pids)
    # When up itself is killed with SIGKILL (it can stop nothing itself)
    up.process.kill()
    up.process.wait(10)
    # Then every node it started exits within 5 s: those it reported, and any other process
    # of this topology (one it restarted in its last instant, say)
    began = time.monotonic()
    wait_until(lambda: not any(alive(pid) for pid in pids) and not up.leftovers(), 5,
               "every node of the killed up to exit")
    assert time.monotonic() - began < 5
    load.cleanup()


def test_a_random_node_killed_every_2_s_under_load_loses_and_doubles_nothing(started, tmp_path):
    # Given a durable `zmqlab up` and a paced load that lasts beyond the kill loop
    up = start_up(started, tmp_path)
    rate = 1000
    records = int(rate * (KILL_LOOP_S + 4))
    load = start_load(started, up, records=records, rate=rate)
    wait_until(lambda: up.appended() >= 1000, 30, "the load under way")
    seed = int(os.environ.get("ZMQLAB_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # When a random node (the broker included) is killed with SIGKILL every 2 s: the nodes in
    # a random order, each once before any is killed again, so the broker always is
    kills: list[tuple[float, str, str]] = []
    turn: list[tuple[str, str]] = []
    stop = threading.Event()
    deadline = time.monotonic() + KILL_LOOP_S
    while time.monotonic() < deadline and not stop.wait(KILL_EVERY_S):  # the fault's pace
        now = time.monotonic()
        nodes = up.nodes()
        turn = turn or rng.sample(sorted(nodes), len(nodes))
        recent = Counter((role, name) for t, role, name in kills if now - t < 60)
        # A running node, killed at most 3 times a minute: up gives up on a node that dies 5
        # times within 60 s, which is its policy, not what this test is about.
        victim = next((k for k in turn if k in nodes and nodes[k]["state"] == "running"
                       and recent[k] < 3), None)
        if victim is None:
            continue
        turn.remove(victim)
        up.kill(*victim)
        kills.append((now, *victim))
    # Then up brings every node back
    wait_until(lambda: all(n["state"] == "running" for n in up.nodes().values()), 60,
               "every node running again")
    # and the load ends with every acknowledged record stored exactly once, nothing in flight
    report = load.report()
    assert len(kills) >= KILL_LOOP_S // KILL_EVERY_S - 1, (seed, kills)
    assert KILL_LOOP_S < 14 or ("broker", "broker") in {(r, n) for _, r, n in kills}
    assert_stored_once(report, up.topology.db_url, records)
    assert_nothing_in_flight(up)
    restarts = Counter((role, name) for _, role, name in kills)
    nodes = up.nodes()
    assert {k: nodes[k]["restarts"] for k in restarts} == dict(restarts), (seed, kills)
    assert up.stop() == 0, up.logs()


def test_a_backlog_held_by_a_killed_broker_is_delivered_once_after_a_restart(started,
                                                                           tmp_path):
    # Given a durable `zmqlab up` without consumers, holding a backlog of acknowledged records
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{tmp_path / 'records.db'}"
    capacity = str(BACKLOG_RECORDS // 6 + 1000)  # unkeyed records spread evenly: all fit
    first = start_up(started, tmp_path, "first", consumers=0, data_dir=data_dir, db_url=db_url,
                     extra=("--capacity", capacity))
    report = start_load(started, first, BACKLOG_RECORDS, 0, verify_db=False, keys=0).report()
    assert report["acked"] == BACKLOG_RECORDS
    snap = first.broker()
    assert snap is not None and sum(p["depth"] for p in snap["partitions"]) == BACKLOG_RECORDS
    assert sum(p["disk_bytes"] for p in snap["partitions"]) > 0
    # When the broker is killed with SIGKILL, and up with it
    pids = [n["pid"] for n in first.nodes().values()]
    first.kill("broker", "broker")
    first.process.kill()
    first.process.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in pids), 15, "the first topology gone")
    # and a new up with consumers starts on the same log
    second = start_up(started, tmp_path, "second", data_dir=data_dir, db_url=db_url,
                      extra=("--capacity", capacity))
    # Then the broker recovered the whole backlog (said by the first broker to open the log:
    # the second up's, or that of an attempt that found a port taken and stopped)
    said = "".join(log.read_text() for log in sorted(tmp_path.glob("second*.err")))
    assert f"recovered {BACKLOG_RECORDS} record(s) from {data_dir}" in said, said[-3000:]
    snap = second.broker()
    assert snap is not None and snap["log"]["dir"] == str(data_dir)
    # and every acknowledged record is delivered and stored exactly once
    # (all were acknowledged, so their ids are the run's prefix and 0 .. N-1: loadgen's ids)
    acked = [f"{report['run_id']}-{seq}" for seq in range(BACKLOG_RECORDS)]
    verified = verify(db_url, acked, timeout_s=90, prefix=report["run_id"] + "-")
    assert (verified.persisted, verified.lost, verified.duplicates, verified.unexpected) == (
        BACKLOG_RECORDS, 0, 0, 0), second.logs()
    assert_nothing_in_flight(second)
    assert second.stop() == 0, second.logs()


def test_a_node_that_keeps_dying_makes_up_stop_everything_and_say_why(started, tmp_path):
    # Given `zmqlab up` that gives up on a node dying twice within a minute
    up = start_up(started, tmp_path, extra=("--restart-limit", "2"))
    consumer = str(up.topology.consumer_port)
    pids = [n["pid"] for n in up.nodes().values()]
    # When that consumer is killed, restarted, and killed again
    up.kill("consumer", consumer)
    up.wait_running("consumer", consumer, restarts=1)
    pids.append(up.kill("consumer", consumer))
    # Then up stops every other node and exits 1 with one line saying why
    assert up.process.wait(60) == 1, up.logs()
    assert not any(alive(pid) for pid in pids)
    said = " ".join(up.err.read_text().split())  # as one line, however the console wrapped it
    assert said.endswith(f"error: consumer {consumer} died 2 times within 60 s (last: signal "
                         "SIGKILL); giving up"), up.logs()
