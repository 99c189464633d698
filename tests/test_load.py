"""Issue 3: the load generator, the demo, ``status --json`` and the live view, end to end.

Process tests run the real CLI over TCP loopback against nodes started by ``Supervisor`` (what
``zmqlab up`` runs), on random free ports in 20000-30000 so that they never meet a developer's
``zmqlab up`` on the seed ports. Every subprocess has a timeout; waits poll a condition against
a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Fabric

from zmqlab.assignment import round_robin
from zmqlab.dashboard import RateTracker
from zmqlab.errors import ConfigError
from zmqlab.loadgen import (
    LoadOptions,
    PayloadMaker,
    padded_payload,
    parse_endpoints,
    percentile,
    run_load,
    weighted_percentile,
)
from zmqlab.producer import Producer, make_record
from zmqlab.topology import Supervisor, Topology, query_status

CLI = [sys.executable, "-m", "zmqlab"]


# -- helpers -----------------------------------------------------------------------------------
def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a restarted server binds: TIME_WAIT left by a clean close does not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(span: int = 30) -> int:
    """A random base port in 20000-30000 with ``span`` free ports after it."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - span, 10)
        if all(_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free port range in 20000-30000")


def make_topology(tmp_path: Path, *, producers: int = 3, consumers: int = 3,
                  partitions: int = 6) -> Topology:
    base = free_base()
    return Topology(frontend_port=base, backend_port=base + 1, producers=producers,
                    producer_port=base + 10, consumers=consumers, consumer_port=base + 20,
                    partitions=partitions, db_url=f"sqlite:///{tmp_path / 'records.db'}",
                    log_level="warning")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    """Start topologies as processes; every one is stopped (by PID) at teardown."""
    started: list[Supervisor] = []

    def _start(**kwargs: Any) -> Supervisor:
        supervisor = Supervisor(make_topology(tmp_path, **kwargs),
                                log_dir=str(tmp_path / "logs"))
        started.append(supervisor)
        supervisor.start(ready_timeout_s=30)
        return supervisor

    yield _start
    for supervisor in started:
        supervisor.stop(timeout_s=10)


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, env=None)


def last_json(stdout: str) -> dict[str, Any]:
    """The JSON object a ``--json`` command printed (the whole of stdout)."""
    return json.loads(stdout)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.05)  # polling interval, not synchronisation: the condition decides
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


# -- units -------------------------------------------------------------------------------------
def test_endpoints_accept_the_short_form() -> None:
    assert parse_endpoints("tcp://127.0.0.1:8080,8081, 8082") == [
        "tcp://127.0.0.1:8080", "tcp://127.0.0.1:8081", "tcp://127.0.0.1:8082"]
    assert parse_endpoints("tcp://a:1,tcp://b:2,3") == ["tcp://a:1", "tcp://b:2", "tcp://b:3"]
    assert parse_endpoints("localhost:9000") == ["tcp://localhost:9000"]
    for bad in ("8080", "", "tcp://host", "nonsense"):
        with pytest.raises(ConfigError):
            parse_endpoints(bad)


def test_payload_is_a_json_object_of_the_requested_size() -> None:
    for size in (40, 200, 1000):
        payload = padded_payload(size, 12345, 7)
        assert len(payload) == size
        assert json.loads(payload)["seq"] == 12345
    assert json.loads(padded_payload(2, 1, 0)) == {"seq": 1}  # smallest possible


def test_payloads_keep_their_size_when_the_sequence_gains_a_digit() -> None:
    maker = PayloadMaker(200, 3)
    for seq in (0, 9, 10, 99, 100, 99_999, 100_000, 10**12):
        payload = maker(seq)
        assert len(payload) == 200 and json.loads(payload) == json.loads(
            padded_payload(200, seq, 3))
        assert json.loads(payload)["seq"] == seq and json.loads(payload)["client"] == 3
    assert maker.many(8, 4) == [maker(s) for s in range(8, 12)]


def test_weighted_percentile_matches_the_expanded_list() -> None:
    pairs = [(0.001, 3), (0.002, 90), (0.010, 6), (0.500, 1)]
    expanded = [value for value, n in pairs for _ in range(n)]
    for q in (1, 3, 4, 50, 93, 94, 99, 99.5, 100):
        assert weighted_percentile(pairs, q) == percentile(expanded, q), q
    assert weighted_percentile([], 50) is None


def test_a_partly_refused_batch_counts_only_its_acknowledged_ids(ctx, db_url) -> None:
    # Given one partition with room for 25 records and no consumer to make more
    fabric = Fabric(ctx, db_url, producers=1, consumers=0, partitions=1, capacity=25).start()
    try:
        # When 40 records go in batches of 10 with a deadline the full partition outlives
        options = LoadOptions((fabric.ingress["8080"],), records=40, clients=1, batch=10,
                              deadline_s=1.0)
        report = run_load(options, run_id="partial", context=ctx)
    finally:
        fabric.stop()
    # Then the first 25 are acknowledged, the 5 that did not fit are refused at the deadline
    # (and the last batch too, if it went before the deadline), and only acknowledged ids
    # are handed to verify
    assert report.acked == 25 and report.refused + report.unacked == 15
    assert report.refusals["PARTITION_FULL"]["count"] == report.refused >= 5
    assert sorted(report.acked_ids(), key=lambda i: int(i.split("-")[1])) == [
        f"partial-{seq}" for seq in range(25)]
    assert sum(n for _, n in report.ack_latencies) == 25
    assert not report.ok


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 50) is None


def test_rates_come_from_successive_snapshots_and_survive_a_restart() -> None:
    def snap(uptime: float, appended: int) -> dict[str, Any]:
        return {"uptime_s": uptime, "partitions": [{"partition": 0, "appended": appended,
                                                    "acked": 0}],
                "consumers": [], "producers": []}

    tracker = RateTracker()
    assert tracker.update(snap(10, 100), now=0.0).partition_in[0] is None  # nothing to compare
    assert tracker.update(snap(11, 600), now=1.0).partition_in[0] == 500
    assert tracker.update(snap(1, 50), now=2.0).partition_in[0] is None  # broker restarted
    assert tracker.update(snap(2, 250), now=3.0).partition_in[0] == 200


# -- processes ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_load_verify_against_a_running_topology_loses_nothing(start) -> None:
    # Given the seed topology running as processes
    supervisor = start()
    topology = supervisor.topology
    to = ",".join(topology.producer_endpoints())
    # When a keyed load is sent through all three producer services and verified
    result = run_cli("load", "--to", to, "--records", "3000", "--clients", "4", "--keys", "16",
                     "--size", "200", "--deadline", "30", "--verify", topology.db_url,
                     "--verify-timeout", "30", "--json")
    # Then every acknowledged record is stored exactly once and the exit code says so
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["records"] == report["acked"] == report["persisted"] == 3000
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["refused"] == 0
    assert report["ack_p50_ms"] is not None and report["e2e_p99_ms"] is not None
    assert sum(report["by_consumer"].values()) == 3000


@pytest.mark.e2e
def test_load_against_a_stopped_producer_reports_refusals_and_fails() -> None:
    # Given no producer service on the port
    dead = free_base(2)
    began = time.monotonic()
    # When a load is sent there with short timeouts
    result = run_cli("load", "--to", f"tcp://127.0.0.1:{dead},{dead + 1}", "--records", "40",
                     "--clients", "2", "--deadline", "3", "--timeout-ms", "200", "--retries", "1",
                     "--json", timeout_s=30)
    # Then it says so clearly, quickly, with a non-zero exit code
    assert time.monotonic() - began < 20
    assert result.returncode != 0
    report = last_json(result.stdout)
    assert report["acked"] == 0
    assert report["refused"] == 40
    assert report["refusals"]["UNAVAILABLE"]["count"] == 40
    assert f"127.0.0.1:{dead}" in report["refusals"]["UNAVAILABLE"]["reason"]
    assert "refused" in result.stderr and "UNAVAILABLE" in result.stderr


@pytest.mark.e2e
def test_demo_runs_to_completion_on_other_ports(tmp_path: Path) -> None:
    base = free_base()
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    result = run_cli("demo", "--records", "3000", "--db", db,
                     "--frontend-port", str(base), "--backend-port", str(base + 1),
                     "--producer-port", str(base + 10), "--consumer-port", str(base + 20),
                     "--deadline", "30", "--verify-timeout", "30", timeout_s=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "lost" in result.stdout
    assert str(base + 20) in result.stdout  # the per-consumer summary names the consumers
    # and it left nothing listening behind
    assert wait_for(lambda: all(_free(base + i) for i in (0, 1, 10, 11, 12, 20, 21, 22)),
                    10, "the demo's ports to be released")


@pytest.mark.e2e
def test_status_json_reflects_depths_then_owners(start, tmp_path: Path) -> None:
    # Given a broker with no consumers and no producer services
    supervisor = start(producers=0, consumers=0, partitions=4)
    topology = supervisor.topology
    keys = [f"user-{i}" for i in range(7)]
    sent = [keys[i % len(keys)] for i in range(45)]
    # When records with known keys are sent straight to the broker's frontend
    with Producer(topology.frontend, timeout_ms=2000) as client:
        client.send_batch([make_record({"n": i}, key=key) for i, key in enumerate(sent)])
    # Then each partition holds exactly the records whose crc32(key) % P points at it
    expected = Counter(zlib.crc32(k.encode()) % 4 for k in sent)
    result = run_cli("status", "--broker", topology.frontend, "--json", timeout_s=30)
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert [p["depth"] for p in snap["partitions"]] == [expected[p] for p in range(4)]
    assert all(p["owner"] is None and p["inflight"] == 0 for p in snap["partitions"])
    assert snap["consumers"] == []

    # When two consumers start
    with_consumers = dataclasses.replace(topology, consumers=2)
    for role, name, argv in with_consumers.commands():
        if role == "consumer":
            supervisor.spawn(role, name, argv)
    names = [str(with_consumers.consumer_port + i) for i in range(2)]

    def drained() -> dict[str, Any] | None:
        snap = query_status(topology.frontend, timeout_ms=1000)
        done = all(p["depth"] == 0 for p in snap["partitions"]) and len(snap["consumers"]) == 2
        return snap if done else None

    wait_for(drained, 30, "both consumers to register and drain every partition")
    # Then `status --json` shows owners following round_robin, and nothing left queued
    result = run_cli("status", "--broker", topology.frontend, "--json", timeout_s=30)
    snap = json.loads(result.stdout)
    owners = round_robin(4, names)
    assert [p["owner"] for p in snap["partitions"]] == [owners[p] for p in range(4)]
    assert [c["name"] for c in snap["consumers"]] == names
    assert sum(p["acked"] for p in snap["partitions"]) == len(sent)

    # And the live view renders that state within its time bound
    watched = run_cli("watch", "--broker", topology.frontend, "--for", "1", "--interval", "0.3",
                      timeout_s=30)
    assert watched.returncode == 0, watched.stderr
    assert "Q4" in watched.stdout and names[1] in watched.stdout
    assert "unreachable" not in watched.stdout


@pytest.mark.e2e
def test_watch_shows_an_unreachable_broker_and_ends_on_time() -> None:
    port = free_base(1)
    began = time.monotonic()
    result = run_cli("watch", "--broker", f"tcp://127.0.0.1:{port}", "--for", "1",
                     "--interval", "0.3", timeout_s=30)
    assert result.returncode == 0, result.stderr
    assert "unreachable" in result.stdout
    assert time.monotonic() - began < 15
