"""Start, watch, restart and stop a whole topology as separate processes (``zmqlab up``, tests,
demo).

Children run in their own sessions so that only this supervisor signals them, in order:
producers first (no new records), then the broker (it drains what it holds to the consumers,
for at most its drain timeout), then consumers (they finish and ACK what they hold).

Supervision, as supervisord's ``startretries`` and systemd's ``Restart=on-failure`` with
``StartLimitBurst``: ``Supervisor.step(now)`` restarts a child that died after a backoff that
doubles from ``RestartPolicy.initial_delay_s`` up to ``max_delay_s`` (back to the start once a
child ran ``stable_s``), and names the child that died ``max_deaths`` times within
``window_s``: then the caller stops the rest. Every other node carries on meanwhile, because
each one registers again with a broker that came back (docs/sessions.md). ``step`` takes the
clock as an argument and the processes come from ``popen``, so tests drive it with fake time
and fake processes.

Children die with their supervisor, even one killed with SIGKILL: each child calls
``die_with_parent`` first thing (``PR_SET_PDEATHSIG`` plus a check of its parent's pid).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import zmq

from zmqlab import protocol as proto
from zmqlab.config import DEFAULT_DB_URL
from zmqlab.errors import BrokerUnavailable, ZmqlabError
from zmqlab.node import Handler, Node, bind, new_socket, serve_requests
from zmqlab.producer import Producer
from zmqlab.protocol import Command

log = logging.getLogger("zmqlab.supervisor")

PARENT_PID_ENV = "ZMQLAB_SUPERVISOR_PID"  # set by the supervisor for each child it starts
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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
    data_dir: str | None = None  # the broker's write-ahead log; None keeps records in memory
    fsync: str = "batch"  # with data_dir: the broker's --fsync
    insecure: bool = False  # a host other than loopback: the nodes get --insecure
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
        durable = [] if self.data_dir is None else ["--data-dir", self.data_dir,
                                                    "--fsync", self.fsync]
        logs += ["--insecure"] if self.insecure else []  # every node takes it, as the logs'
        out = [("broker", "broker", [*base, "broker", "--frontend", self.frontend,
                                      "--backend", self.backend,
                                      "--partitions", str(self.partitions),
                                      "--capacity", str(self.capacity),
                                      "--heartbeat-ms", str(self.heartbeat_ms),
                                      *durable, *self.broker_args, *logs])]
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


class Process(Protocol):
    """What the supervisor uses of a ``subprocess.Popen`` (tests pass a fake)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead child is started again, and when the supervisor gives up instead."""

    initial_delay_s: float = 0.5  # the first restart waits this long, each next one twice that
    max_delay_s: float = 30.0
    max_deaths: int = 5  # this many deaths of one child within window_s: give up
    window_s: float = 60.0
    stable_s: float = 60.0  # a child that ran this long starts its backoff over

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay_s <= self.max_delay_s:
            raise ZmqlabError("restart delays must satisfy 0 < initial <= max, got "
                              f"{self.initial_delay_s} and {self.max_delay_s}")
        if self.max_deaths < 1 or self.window_s <= 0 or self.stable_s <= 0:
            raise ZmqlabError("max_deaths must be at least 1, window_s and stable_s positive")


class State(StrEnum):
    RUNNING = "running"
    BACKOFF = "backoff"  # dead, waiting for its restart
    FATAL = "fatal"  # died too often: the supervisor gave up on it
    STOPPED = "stopped"


@dataclass
class Child:
    role: str
    name: str
    argv: list[str]
    process: Process
    started_at: float = 0.0
    state: State = State.RUNNING
    restarts: int = 0
    last_exit: int | None = None
    delay_s: float = 0.0  # the wait before its next restart
    restart_at: float | None = None
    deaths: deque[float] = field(default_factory=deque)  # within the policy's window


def describe_exit(code: int | None) -> str:
    """``exit code 1``, ``signal SIGKILL``, or ``no exit code``."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclass
class Supervisor:
    """Starts the topology's nodes, restarts the ones that die (``step``), stops them in order.

    Drive it from one thread (``start``, ``step``, ``stop``); ``snapshot`` may be called from
    any. Call ``start``, ``spawn`` and ``step`` from a thread that lives as long as the
    supervisor: ``PR_SET_PDEATHSIG`` fires when the thread that started a child ends.
    """

    topology: Topology
    log_dir: str | None = None  # children's logs go here (one file each) instead of our stderr
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    popen: Callable[..., Process] = subprocess.Popen
    clock: Callable[[], float] = time.monotonic
    children: list[Child] = field(default_factory=list)
    started_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start every node and wait until each answers (or stop them all and raise)."""
        self.started_at = self.clock()
        try:
            for role, name, argv in self.topology.commands():
                self.spawn(role, name, argv)
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def spawn(self, role: str, name: str, argv: list[str]) -> Child:
        now = self.clock()
        child = Child(role, name, argv, self._launch(role, name, argv), started_at=now,
                      delay_s=self.policy.initial_delay_s)
        with self._lock:
            self.children.append(child)
        return child

    def _launch(self, role: str, name: str, argv: list[str]) -> Process:
        stderr: Any = None
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            stderr = open(os.path.join(self.log_dir, f"{role}-{name}.log"), "ab")  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_PID_ENV: str(os.getpid())})
        try:
            return self.popen(argv, stdin=subprocess.DEVNULL, stdout=stderr or None,
                              stderr=stderr, start_new_session=True, env=env)
        finally:
            if stderr is not None:
                stderr.close()

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
        """Raise ZmqlabError naming the first child that exited (while starting, or without
        ``step``, any exit is an error)."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise ZmqlabError(f"{child.role} {child.name} exited with code {code}")

    def step(self, now: float) -> str | None:
        """One round of supervision at ``now``: note the children that died, restart those
        whose backoff ended (in the topology's order, broker first). Returns why to give up,
        in one line, when a child died ``policy.max_deaths`` times within ``policy.window_s``;
        the caller then stops the others (``stop``)."""
        with self._lock:
            for child in self.children:
                if child.state is State.RUNNING and child.process.poll() is not None:
                    failure = self._died(child, now, describe_exit(child.process.returncode))
                    if failure is not None:
                        return failure
            for child in self.children:
                if (child.state is State.BACKOFF and child.restart_at is not None
                        and now >= child.restart_at):
                    failure = self._restart(child, now)
                    if failure is not None:
                        return failure
        return None

    def _died(self, child: Child, now: float, how: str) -> str | None:
        policy = self.policy
        child.last_exit = child.process.returncode
        ran_s = now - child.started_at
        if ran_s >= policy.stable_s:
            child.delay_s = policy.initial_delay_s
        child.deaths.append(now)
        while child.deaths[0] <= now - policy.window_s:
            child.deaths.popleft()
        if len(child.deaths) >= policy.max_deaths:
            child.state, child.restart_at = State.FATAL, None
            failure = (f"{child.role} {child.name} died {len(child.deaths)} times within "
                       f"{policy.window_s:g} s (last: {how}); giving up")
            log.error("%s", failure)
            return failure
        delay = child.delay_s
        child.delay_s = min(delay * 2, policy.max_delay_s)
        child.state, child.restart_at = State.BACKOFF, now + delay
        log.warning("%s %s (pid %d) died: %s after %.1f s; restart %d in %.1f s", child.role,
                    child.name, child.process.pid, how, ran_s, child.restarts + 1, delay)
        return None

    def _restart(self, child: Child, now: float) -> str | None:
        try:
            child.process = self._launch(child.role, child.name, child.argv)
        except OSError as exc:  # nothing ran: as a death, so a lasting cause ends in give-up
            child.started_at = now
            return self._died(child, now, f"could not start: {exc}")
        child.restarts += 1
        child.started_at, child.state, child.restart_at = now, State.RUNNING, None
        log.warning("%s %s restarted (restart %d, pid %d)", child.role, child.name,
                    child.restarts, child.process.pid)
        return None

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Every child's role, name, pid, state, restarts and last exit (``zmqlab status``)."""
        now = self.clock() if now is None else now
        with self._lock:
            nodes = [{
                "role": c.role, "name": c.name, "pid": c.process.pid, "state": c.state.value,
                "restarts": c.restarts, "last_exit": c.last_exit,
                "last_exit_text": None if c.last_exit is None else describe_exit(c.last_exit),
                "uptime_s": round(now - c.started_at, 3) if c.state is State.RUNNING else None,
                "restart_in_s": (round(max(0.0, c.restart_at - now), 3)
                                 if c.restart_at is not None else None),
            } for c in self.children]
        policy = self.policy
        return {"pid": os.getpid(),
                "uptime_s": None if self.started_at is None else round(now - self.started_at, 3),
                "policy": {"initial_delay_s": policy.initial_delay_s,
                           "max_delay_s": policy.max_delay_s, "max_deaths": policy.max_deaths,
                           "window_s": policy.window_s, "stable_s": policy.stable_s},
                "nodes": nodes}

    def find(self, role: str, name: str) -> Child:
        for child in self.children:
            if child.role == role and child.name == name:
                return child
        raise KeyError(f"{role} {name}")

    def kill(self, child: Child) -> None:
        """SIGKILL one node (chaos); the supervisor forgets it."""
        child.process.kill()
        child.process.wait(10)
        with self._lock:
            self.children.remove(child)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM producers, then the broker (it drains to the consumers), then consumers;
        SIGKILL what does not stop. Each node's exit code (the last one, for a node that was
        waiting for its restart)."""
        codes: dict[str, int] = {}
        for role in ("producer", "broker", "consumer"):
            with self._lock:
                group = [c for c in self.children if c.role == role]
                for child in group:
                    child.restart_at = None
            stop_processes([c.process for c in group], signal.SIGTERM, timeout_s)
            with self._lock:
                for child in group:
                    code = child.process.returncode
                    codes[f"{child.role} {child.name}"] = -1 if code is None else code
                    if child.state is not State.FATAL:
                        child.state = State.STOPPED
                    child.last_exit = code
                    self.children.remove(child)
        return codes


def stop_processes(processes: Sequence[Process], sig: int = signal.SIGTERM,
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
    """STATS of a broker, producer service, consumer or supervisor status endpoint (one try)."""
    with Producer(endpoint, timeout_ms=timeout_ms, retries=0) as client:
        return client.status()


def query_supervisor(endpoint: str, timeout_ms: int = 300) -> dict[str, Any] | None:
    """The snapshot of ``zmqlab up``'s status endpoint, or None when nothing (or something
    else) answers there within ``timeout_ms``."""
    try:
        snap = query_status(endpoint, timeout_ms=timeout_ms)
    except ZmqlabError:
        return None
    return snap if isinstance(snap.get("nodes"), list) else None


class StatusService(Node):
    """``zmqlab up``'s status endpoint: STATS answers with ``Supervisor.snapshot``.

    A ROUTER on its own thread (the supervisor's thread waits on its children), replies never
    block (``serve_requests``).
    """

    kind = "supervisor"

    def __init__(self, supervisor: Supervisor, endpoint: str, *,
                 context: zmq.Context[Any] | None = None) -> None:
        super().__init__(context)
        self.supervisor = supervisor
        self.endpoint = endpoint
        self._handlers: dict[Command, Handler] = {Command.STATS: self._handle_stats}

    def _handle_stats(self, _route: list[bytes], _message: proto.Message) -> list[bytes]:
        return proto.encode(Command.STATS, self.supervisor.snapshot())

    def serve(self, control: zmq.Socket[Any]) -> None:
        router = new_socket(self.context, zmq.ROUTER, router_mandatory=1)
        try:
            bind(router, self.endpoint, "supervisor status")
            self.bound()
            poller = zmq.Poller()
            poller.register(control, zmq.POLLIN)
            poller.register(router, zmq.POLLIN)
            while True:
                events = dict(poller.poll())  # only a request or the stop wakes it
                if control in events:
                    return
                if router in events:
                    serve_requests(router, self._handlers, log=self.log,
                                   unknown="{command} is not served by the supervisor")
        finally:
            router.close(0)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child a ``Supervisor`` started (``ZMQLAB_SUPERVISOR_PID`` set): get ``sig`` when
    the supervisor dies, even by SIGKILL, and exit at once (code 1) if it already died.
    Elsewhere nothing happens. Call it first thing in the child."""
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if expected is None:
        return
    _set_pdeathsig(sig)
    # Both: prctl covers a parent dying from now on, the ppid check one that died before it.
    if str(os.getppid()) != expected:
        sys.stderr.write(f"zmqlab: the supervisor (pid {expected}) is gone; exiting\n")
        raise SystemExit(1)


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` through ctypes; False where Linux's prctl is missing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
