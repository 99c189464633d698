"""A network cut between the broker and one consumer, with hosts in network namespaces this
test creates (ip netns + veth; needs root, as in CI). The broker host (broker and two consumers)
and the consumer host are joined by one veth link, which the test takes down and up again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from sqlalchemy import select

from zmqlab.store import RECORDS, make_engine
from zmqlab.topology import stop_processes

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent
HEARTBEAT_MS, LIVENESS = 300, 3


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    problem = _can_make_namespaces()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the network-cut test must run in CI: {problem}")
        pytest.skip(problem)
    tag = uuid.uuid4().hex[:6]
    broker_ns, consumer_ns = f"zqb-{tag}", f"zqc-{tag}"
    veth_b, veth_c = f"zqb{tag}", f"zqc{tag}"
    ip("netns", "add", broker_ns)
    ip("netns", "add", consumer_ns)
    try:
        for ns in (broker_ns, consumer_ns):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", veth_b, "type", "veth", "peer", "name", veth_c)
        ip("link", "set", veth_b, "netns", broker_ns)
        ip("link", "set", veth_c, "netns", consumer_ns)
        ip("-n", broker_ns, "addr", "add", "10.231.7.1/30", "dev", veth_b)
        ip("-n", consumer_ns, "addr", "add", "10.231.7.2/30", "dev", veth_c)
        ip("-n", broker_ns, "link", "set", veth_b, "up")
        ip("-n", consumer_ns, "link", "set", veth_c, "up")
        yield {"broker_ns": broker_ns, "consumer_ns": consumer_ns, "link": veth_c,
               "broker_ip": "10.231.7.1"}
    finally:
        for ns in (broker_ns, consumer_ns):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def in_ns(ns: str, *argv: str, **kwargs: Any) -> subprocess.Popen[Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *argv],
                            env=env, stdin=subprocess.DEVNULL, **kwargs)


def run_in(ns: str, *argv: str, timeout: float = 60) -> str:
    process = in_ns(ns, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return str(out).splitlines()[-1]


def test_a_cut_consumer_expires_its_partitions_move_and_it_rejoins(hosts, tmp_path: Path):
    db_url = f"sqlite:///{tmp_path / 'netns.db'}"
    bns, cns = hosts["broker_ns"], hosts["consumer_ns"]
    frontend = "tcp://127.0.0.1:5555"
    beat = ["--heartbeat-ms", str(HEARTBEAT_MS), "--liveness", str(LIVENESS)]
    logs = [open(tmp_path / f"{n}.log", "wb") for n in ("broker", "c9090", "c9091", "c9092")]
    nodes = [
        in_ns(bns, "-m", "zmqlab", "broker", "--frontend", frontend,
              "--backend", "tcp://0.0.0.0:5556", "--insecure", *beat, stderr=logs[0]),
        in_ns(cns, "-m", "zmqlab", "consumer", "--port", "9090", "--db", db_url,
              "--broker", f"tcp://{hosts['broker_ip']}:5556", *beat, stderr=logs[1]),
        in_ns(bns, "-m", "zmqlab", "consumer", "--port", "9091", "--db", db_url, *beat,
              stderr=logs[2]),
        in_ns(bns, "-m", "zmqlab", "consumer", "--port", "9092", "--db", db_url, *beat,
              stderr=logs[3]),
    ]
    for log in logs:
        log.close()
    client = str(HERE / "netns_client.py")
    engine = make_engine(db_url)

    def stored() -> dict[str, str]:
        with engine.connect() as conn:
            return dict(conn.execute(select(RECORDS.c.id, RECORDS.c.consumer)).all())

    try:
        run_in(bns, client, "back", frontend, "9090", "30")
        first = json.loads(run_in(bns, client, "send", frontend, "120", "a"))
        wait_until(lambda: len(stored()) == 120, 30, "first records stored")
        assert "9090" in set(stored().values())

        # Cut the link: the broker must expire 9090 within interval x liveness + 1 s.
        watcher = in_ns(bns, client, "gone", frontend, "9090", "20", stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
        assert watcher.stdout is not None and watcher.stdout.readline() == "watching\n"
        cut_at = time.time()
        ip("-n", cns, "link", "set", hosts["link"], "down")
        out, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        took = float(out) - cut_at
        print(f"consumer expired {took:.2f} s after the cut")
        assert took <= HEARTBEAT_MS * LIVENESS / 1000 + 1.0, f"expired after {took:.2f} s"

        second = json.loads(run_in(bns, client, "send", frontend, "120", "b"))
        wait_until(lambda: set(second) <= set(stored()), 30, "records stored during the cut")
        assert {stored()[i] for i in second} <= {"9091", "9092"}

        # The link returns: 9090 registers again and gets partitions back.
        ip("-n", cns, "link", "set", hosts["link"], "up")
        run_in(bns, client, "back", frontend, "9090", "30")
        third = json.loads(run_in(bns, client, "send", frontend, "120", "c"))
        wait_until(lambda: set(third) <= set(stored()), 30, "records stored after the cut")
        assert "9090" in {stored()[i] for i in third}

        rows = stored()
        assert set(rows) == set(first) | set(second) | set(third) and len(rows) == 360
    finally:
        engine.dispose()
        stop_processes(nodes)
