"""End to end: the CLI as real processes over TCP loopback (up, send, status, assign, errors)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, free_port_block, wait_until
from sqlalchemy import select

from zmqlab.store import RECORDS, make_engine

pytestmark = pytest.mark.e2e
ZMQLAB = [sys.executable, "-m", "zmqlab"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZMQLAB, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class Up:
    """``zmqlab up`` in the background, with its output lines in a queue."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        base = free_port_block(12)
        self.front, self.back = base, base + 1
        self.producers, self.consumers = base + 2, base + 6
        self.status = f"tcp://127.0.0.1:{base + 10}"
        self.data_dir = tmp_path / "data"
        self.db_url = f"sqlite:///{tmp_path / 'up.db'}"
        errors = (tmp_path / "up.err").open("w")
        self.process = subprocess.Popen(
            [*ZMQLAB, "up", "--frontend-port", str(self.front), "--backend-port", str(self.back),
             "--producer-port", str(self.producers), "--consumer-port", str(self.consumers),
             "--status-port", str(base + 10), "--data-dir", str(self.data_dir),
             "--db", self.db_url, "--heartbeat-ms", "300", "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=errors, text=True, stdin=subprocess.DEVNULL)
        errors.close()
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float = 60) -> list[str]:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"no {text!r} from zmqlab up; saw {seen}") from None
            seen.append(line)
            if text in line:
                return seen

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            self.reader.join(10)
            assert self.process.stdout is not None
            self.process.stdout.close()


@pytest.fixture
def up(tmp_path: Path) -> Any:
    node = Up(tmp_path)
    yield node
    node.stop()


def test_up_send_status_then_stop_cleanly(up: Up):
    lines = up.wait_for("ready:")
    assert sum("producer  tcp://" in line for line in lines) == 3
    assert sum("consumer  tcp://" in line for line in lines) == 3

    ids = []
    for i in range(3):
        result = run("send", "--to", f"tcp://127.0.0.1:{up.producers + i}", "--key", f"k{i}",
                     json.dumps({"n": i}))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("acked id=")
        ids.append(result.stdout.split()[1].split("=")[1])

    engine = make_engine(up.db_url)

    def stored() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(select(RECORDS.c.id, RECORDS.c.payload)))

    rows = wait_until(lambda: len(stored()) == 3 and stored(), what="3 rows stored")
    assert sorted(r[0] for r in rows) == sorted(ids)
    engine.dispose()

    status = run("status", "--json", "--broker", f"tcp://127.0.0.1:{up.front}",
                 "--supervisor", up.status)
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    assert [p["owner"] for p in snap["partitions"]] == [
        str(up.consumers + i % 3) for i in range(6)]
    assert sum(p["acked"] for p in snap["partitions"]) == 3
    assert sorted(c["name"] for c in snap["consumers"]) == [
        str(up.consumers + i) for i in range(3)]
    # up's broker is durable by default, and up answers for its nodes
    assert snap["log"]["dir"] == str(up.data_dir)
    assert all("disk_bytes" in p and "segments" in p for p in snap["partitions"])
    nodes = snap["supervisor"]["nodes"]
    assert [(n["role"], n["state"], n["restarts"]) for n in nodes] == [
        ("broker", "running", 0)] + [("consumer", "running", 0)] * 3 + [
        ("producer", "running", 0)] * 3
    table = run("status", "--broker", f"tcp://127.0.0.1:{up.front}", "--supervisor", up.status)
    assert "Q6" in table.stdout and str(up.consumers) in table.stdout
    assert "segs" in table.stdout and "nodes" in table.stdout
    assert str(nodes[0]["pid"]) in table.stdout

    assert up.stop() == 0
    assert "stopped:" in "".join(up.wait_for("stopped:"))


def test_assign_prints_the_seed_tables():
    result = run("assign", "--partitions", "6", "--consumers", "3")
    assert result.returncode == 0
    assert result.stdout.splitlines()[3:] == ["Q4 -> consumer-1 (9090)",
                                              "Q5 -> consumer-2 (9091)",
                                              "Q6 -> consumer-3 (9092)"]


@pytest.mark.parametrize("args, code, text", [
    (["assign", "--partitions", "0"], 2, "partitions"),
    (["send", "not json"], 2, "not JSON"),
    (["send", "[1, 2]"], 2, "JSON object"),
    (["send", '{"a": NaN}'], 2, "not JSON"),  # what a SQL database would refuse
    (["broker", "--partitions", "-1"], 2, "partitions"),
    (["broker", "--frontend", "nowhere"], 2, "ZeroMQ endpoint"),
    (["consumer", "--db", "mysql://x@localhost/db", "--port", "1"], 2, "unsupported"),
    (["consumer", "--transform", "nope", "--port", "1"], 2, "transform"),
    (["broker", "--log-level", "loud"], 2, "log-level"),
])
def test_bad_options_give_one_clear_line_and_no_traceback(args, code, text):
    result = run(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_endpoints_are_reported_without_a_traceback():
    port = free_port()
    send = run("send", "--to", f"tcp://127.0.0.1:{port}", "--timeout-ms", "200",
               "--retries", "1", '{"a": 1}')
    assert send.returncode == 1
    assert "no answer from" in send.stderr and "Traceback" not in send.stderr
    status = run("status", "--broker", f"tcp://127.0.0.1:{port}", "--timeout-ms", "200")
    assert status.returncode == 1
    assert "broker unreachable" in status.stderr and "Traceback" not in status.stderr


def test_a_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("broker", "--frontend", f"tcp://127.0.0.1:{port}",
                     "--backend", f"tcp://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot bind broker frontend" in result.stderr and "Traceback" not in result.stderr


def test_dead_letters_are_listed_and_unknown_ids_are_reported(tmp_path: Path):
    from zmqlab.store import Batch, Delivery, Sink

    db_url = f"sqlite:///{tmp_path / 'dead.db'}"

    def refuse(payload: Any) -> Any:  # a record that really fails: it is tried, then buried
        raise ValueError("this record cannot be stored")

    sink = Sink.open(db_url, "9090", max_attempts=1, transform=refuse)
    sink.store([Batch(0, 1, [Delivery(0, 4, "gone-1", "k", "8080", 1.7e9, 1, b'{"a": 1}')])])
    sink.close()
    listed = run("dead", "list", "--db", db_url, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["attempts"], row["key"]) == ("gone-1", 1, "k")
    table = run("dead", "list", "--db", db_url)
    assert "gone-1" in table.stdout and "1 dead letter" in table.stdout
    missing = run("dead", "replay", "--db", db_url, "--id", "nope", "--to",
                  f"tcp://127.0.0.1:{free_port()}", "--timeout-ms", "200", "--retries", "0")
    assert missing.returncode == 1 and "not a dead letter: nope" in missing.stderr


@pytest.mark.parametrize("args, option", [
    (["broker", "--ack-timeout-ms", "5"], "--ack-timeout-ms"),
    (["producer", "--max-pending-bytes", "1000"], "--max-pending-bytes"),
])
def test_the_new_limits_refuse_values_that_cannot_work(args, option):
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert option in result.stderr and "Traceback" not in result.stderr


def test_a_producer_service_takes_its_byte_bound_from_the_command_line():
    # Given a producer service started with a backlog bound in bytes (and no broker)
    port = free_port()
    process = subprocess.Popen(
        [*ZMQLAB, "producer", "--port", str(port), "--host", "127.0.0.1",
         "--broker", f"tcp://127.0.0.1:{free_port()}", "--max-pending-bytes", "100000000",
         "--log-level", "warning"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        from zmqlab.errors import BrokerUnavailable
        from zmqlab.topology import query_status

        def status() -> Any:
            try:
                return query_status(f"tcp://127.0.0.1:{port}", timeout_ms=300)
            except BrokerUnavailable:
                return None

        # Then its status shows that bound
        snap = wait_until(status, what="the producer service to answer")
        assert (snap["max_pending_bytes"], snap["pending_bytes"]) == (100_000_000, 0)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_a_broker_passes_its_ack_timeout_to_consumers_in_its_welcome():
    """Needs the broker side of consumer sessions (docs/sessions.md: WELCOME carries
    ``ack_timeout_ms``)."""
    import zmq

    from zmqlab import protocol as proto
    from zmqlab.protocol import Command

    front, back = free_port(), free_port()
    process = subprocess.Popen(
        [*ZMQLAB, "broker", "--frontend", f"tcp://127.0.0.1:{front}",
         "--backend", f"tcp://127.0.0.1:{back}", "--ack-timeout-ms", "1234",
         "--log-level", "warning"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ctx = zmq.Context()
    consumer = ctx.socket(zmq.DEALER)
    consumer.setsockopt(zmq.LINGER, 0)
    consumer.setsockopt(zmq.IDENTITY, b"9999")
    consumer.connect(f"tcp://127.0.0.1:{back}")
    try:
        consumer.send_multipart([b"", *proto.encode(Command.HELLO, {"role": "consumer"})])
        assert consumer.poll(15_000), "no WELCOME within 15 s"
        welcome = proto.decode(consumer.recv_multipart()[1:])
        assert welcome.command is Command.WELCOME
        assert welcome.header["ack_timeout_ms"] == 1234
    finally:
        consumer.close(0)
        ctx.term()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
