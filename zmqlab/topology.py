"""Start, watch and stop a whole topology as separate processes (``zmqlab up``, tests, demo).

Children run in their own sessions so that only this supervisor signals them, in order:
producers first (no new records), then the broker (it drains what it holds to the consumers,
for at most its drain timeout), then consumers (they finish and ACK what they hold).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zmqlab.config import DEFAULT_DB_URL
from zmqlab.errors import BrokerUnavailable, ZmqlabError
from zmqlab.producer import Producer


@dataclass(frozen=True)
class Topology:
    host: str = "127.0.0.1"
    frontend_port: int = 5555
    backend_port: int = 5556
    producers: int = 3
    producer_port: int = 8080
    consumers: int = 3
    consumer_port: int = 9090
    partitions: int = 6
    capacity: int = 10_000
    db_url: str = DEFAULT_DB_URL
    heartbeat_ms: int = 1000
    log_level: str = "info"
    log_json: bool = False
    broker_args: tuple[str, ...] = ()
    consumer_args: tuple[str, ...] = ()

    @property
    def frontend(self) -> str:
        return f"tcp://{self.host}:{self.frontend_port}"

    @property
    def backend(self) -> str:
        return f"tcp://{self.host}:{self.backend_port}"

    def producer_endpoints(self) -> list[str]:
        return [f"tcp://{self.host}:{self.producer_port + i}" for i in range(self.producers)]

    def consumer_endpoints(self) -> list[str]:
        return [f"tcp://{self.host}:{self.consumer_port + i}" for i in range(self.consumers)]

    def commands(self) -> list[tuple[str, str, list[str]]]:
        """(role, name, argv) for every node, broker first."""
        base = [sys.executable, "-m", "zmqlab"]
        logs = ["--log-level", self.log_level] + (["--log-json"] if self.log_json else [])
        out = [("broker", "broker", [*base, "broker", "--frontend", self.frontend,
                                      "--backend", self.backend,
                                      "--partitions", str(self.partitions),
                                      "--capacity", str(self.capacity),
                                      "--heartbeat-ms", str(self.heartbeat_ms),
                                      *self.broker_args, *logs])]
        for i in range(self.consumers):
            port = self.consumer_port + i
            out.append(("consumer", str(port), [
                *base, "consumer", "--port", str(port), "--host", self.host,
                "--broker", self.backend, "--db", self.db_url,
                "--heartbeat-ms", str(self.heartbeat_ms), *self.consumer_args, *logs]))
        for i in range(self.producers):
            port = self.producer_port + i
            out.append(("producer", str(port), [
                *base, "producer", "--port", str(port), "--host", self.host,
                "--broker", self.frontend, "--heartbeat-ms", str(self.heartbeat_ms), *logs]))
        return out


@dataclass
class Child:
    role: str
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]


@dataclass
class Supervisor:
    topology: Topology
    log_dir: str | None = None  # children's logs go here (one file each) instead of our stderr
    children: list[Child] = field(default_factory=list)

    def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start every node and wait until each answers (or stop them all and raise)."""
        try:
            for role, name, argv in self.topology.commands():
                self.spawn(role, name, argv)
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def spawn(self, role: str, name: str, argv: list[str]) -> Child:
        stderr: Any = None
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            stderr = open(os.path.join(self.log_dir, f"{role}-{name}.log"), "ab")  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr or None,
                                   stderr=stderr, start_new_session=True, env=env)
        if stderr is not None:
            stderr.close()
        child = Child(role, name, argv, process)
        self.children.append(child)
        return child

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        topology = self.topology
        checks = [("broker", topology.frontend)]
        checks += [("producer " + e.rsplit(":", 1)[1], e) for e in topology.producer_endpoints()]
        checks += [("consumer " + e.rsplit(":", 1)[1], e) for e in topology.consumer_endpoints()]
        for what, endpoint in checks:
            while True:
                self.check_alive()
                try:
                    status = query_status(endpoint, timeout_ms=300)
                    if what.startswith("consumer") and not status.get("registered"):
                        raise BrokerUnavailable("not registered yet")
                    if what.startswith("producer") and not status.get("registered"):
                        raise BrokerUnavailable("not registered yet")
                    break
                except BrokerUnavailable:
                    if time.monotonic() > deadline:
                        raise ZmqlabError(f"{what} at {endpoint} did not become ready within "
                                          f"{timeout_s:.0f} s") from None

    def check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise ZmqlabError(f"{child.role} {child.name} exited with code {code}")

    def find(self, role: str, name: str) -> Child:
        for child in self.children:
            if child.role == role and child.name == name:
                return child
        raise KeyError(f"{role} {name}")

    def kill(self, child: Child) -> None:
        """SIGKILL one node (chaos); the supervisor forgets it."""
        child.process.kill()
        child.process.wait(10)
        self.children.remove(child)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM producers, then the broker (it drains to the consumers), then consumers;
        SIGKILL what does not stop."""
        codes: dict[str, int] = {}
        for role in ("producer", "broker", "consumer"):
            group = [c for c in self.children if c.role == role]
            stop_processes([c.process for c in group], signal.SIGTERM, timeout_s)
            for child in group:
                codes[f"{child.role} {child.name}"] = child.process.returncode
                self.children.remove(child)
        return codes


def stop_processes(processes: Sequence[subprocess.Popen[Any]], sig: int = signal.SIGTERM,
                   timeout_s: float = 20.0) -> None:
    """Signal every process still running, then wait for each; SIGKILL what outlives the
    timeout. Signalling all before waiting lets them stop side by side."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def query_status(endpoint: str, timeout_ms: int = 1000) -> dict[str, Any]:
    """STATS of a broker, producer service or consumer status endpoint (one try)."""
    with Producer(endpoint, timeout_ms=timeout_ms, retries=0) as client:
        return client.status()
