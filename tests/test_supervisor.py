"""The supervisor's restart policy on fake time and fake processes (``Supervisor.step(now)``),
and children that die with their supervisor (``die_with_parent``) with real processes."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from zmqlab.errors import ZmqlabError
from zmqlab.runner import run_supervisor
from zmqlab.topology import (
    PARENT_PID_ENV,
    RestartPolicy,
    State,
    Supervisor,
    Topology,
    describe_exit,
)

ROOT = Path(__file__).resolve().parent.parent


class FakeProcess:
    """What the supervisor uses of a Popen: it runs until ``die`` or a signal ends it."""

    def __init__(self, world: World, argv: list[str], **options: Any) -> None:
        self.world = world
        self.argv = argv
        self.options = options
        self.pid = world.next_pid
        world.next_pid += 1
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.argv, timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.world.signalled.append((self.argv[0], sig))
        if self.returncode is None:
            self.returncode = -sig

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def die(self, code: int = -signal.SIGKILL) -> None:
        self.returncode = code


class World:
    """Every fake process started, in order, and every signal sent."""

    def __init__(self) -> None:
        self.next_pid = 1000
        self.started: list[FakeProcess] = []
        self.signalled: list[tuple[str, int]] = []

    def popen(self, argv: list[str], **options: Any) -> FakeProcess:
        process = FakeProcess(self, argv, **options)
        self.started.append(process)
        return process


def supervise(policy: RestartPolicy | None = None, **topology: Any) -> tuple[Supervisor, World]:
    """A supervisor of fake processes named by role (argv[0] is ``role-name``), started at 0."""
    world = World()
    supervisor = Supervisor(Topology(**topology), policy=policy or RestartPolicy(),
                            popen=world.popen, clock=lambda: 0.0)
    for role, name, _ in Topology(**topology).commands():
        supervisor.spawn(role, name, [f"{role}-{name}"])
    return supervisor, world


def kill_and_time_restart(supervisor: Supervisor, child: Any, now: float) -> float:
    """SIGKILL ``child`` at ``now``; step until it is restarted; the delay it waited."""
    child.process.die()
    assert supervisor.step(now) is None
    assert child.state is State.BACKOFF
    delay = child.restart_at - now
    assert supervisor.step(child.restart_at - 0.01) is None and child.state is State.BACKOFF
    assert supervisor.step(child.restart_at) is None and child.state is State.RUNNING
    return round(delay, 3)


def test_restarts_back_off_from_half_a_second_doubling_up_to_30_s():
    # Given a consumer that keeps dying, with the give-up limit out of the way
    supervisor, world = supervise(RestartPolicy(max_deaths=100, window_s=1.0), producers=0)
    consumer = supervisor.find("consumer", "9090")
    # When it dies right after each restart
    delays, now = [], 100.0
    for _ in range(9):
        delays.append(kill_and_time_restart(supervisor, consumer, now))
        now = consumer.started_at + 1.0
    # Then each restart waits twice as long as the one before, up to 30 s
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert consumer.restarts == 9 and len(world.started) == 4 + 9
    assert consumer.process is world.started[-1] and consumer.process.argv == ["consumer-9090"]


def test_a_child_that_ran_stably_starts_its_backoff_over():
    # Given a broker that died three times in a row (its next restart would wait 4 s)
    supervisor, _ = supervise(RestartPolicy(window_s=5.0, stable_s=60.0), producers=0,
                              consumers=0)
    broker = supervisor.find("broker", "broker")
    now = 10.0
    for _ in range(3):
        kill_and_time_restart(supervisor, broker, now)
        now = broker.started_at + 1.0
    # When it then runs for a minute before dying again
    # Then its restart waits the first delay again
    assert kill_and_time_restart(supervisor, broker, broker.started_at + 60.0) == 0.5
    # and one that ran less than that keeps doubling
    assert kill_and_time_restart(supervisor, broker, broker.started_at + 59.0) == 1.0


def test_five_deaths_within_60_s_give_up_with_a_one_line_reason(caplog):
    # Given a producer service that dies at once after every restart
    supervisor, world = supervise(consumers=0)
    producer = supervisor.find("producer", "8081")
    now, failure = 0.0, None
    # When it died four times (restarted each time) and dies a fifth time within 60 s
    for _ in range(4):
        kill_and_time_restart(supervisor, producer, now)
        now = producer.started_at + 0.1
    producer.process.die(3)
    with caplog.at_level(logging.ERROR, logger="zmqlab.supervisor"):
        failure = supervisor.step(now)
    # Then the supervisor gives up on it, naming it, how often and how it last died
    assert failure == "producer 8081 died 5 times within 60 s (last: exit code 3); giving up"
    assert "\n" not in failure and failure in caplog.text
    assert producer.state is State.FATAL and producer.restarts == 4
    assert supervisor.step(now + 100) is None and len(world.started) == 4 + 4  # not again
    # and stopping the rest goes in the usual order: producers, broker, consumers
    codes = supervisor.stop(timeout_s=1)
    assert [argv for argv, _ in world.signalled] == ["producer-8080", "producer-8082",
                                                     "broker-broker"]
    assert codes["producer 8081"] == 3 and codes["broker broker"] == -signal.SIGTERM


def test_deaths_spread_over_more_than_the_window_do_not_give_up():
    # Given a consumer that dies every 20 s (restarts wait at most 4 s here)
    supervisor, _ = supervise(RestartPolicy(max_delay_s=4.0), producers=0)
    consumer = supervisor.find("consumer", "9091")
    # When it died ten times, never five within 60 s
    for now in range(0, 200, 20):
        kill_and_time_restart(supervisor, consumer, now)
    # Then it was restarted every time
    assert consumer.restarts == 10 and consumer.state is State.RUNNING


def test_nodes_that_die_together_restart_broker_first_and_each_event_is_one_log_line(caplog):
    # Given the seed topology under supervision
    supervisor, world = supervise()
    started = len(world.started)
    # When a producer, a consumer and the broker die in the same step
    supervisor.find("producer", "8082").process.die()
    supervisor.find("consumer", "9091").process.die(1)
    broker = supervisor.find("broker", "broker")
    broker.process.die(-signal.SIGSEGV)
    with caplog.at_level(logging.INFO, logger="zmqlab.supervisor"):
        assert supervisor.step(50.0) is None
        assert len(world.started) == started  # nothing restarted before its delay
        assert supervisor.step(50.5) is None
    # Then they restart in the topology's order: broker, consumers, producers
    assert [p.argv[0] for p in world.started[started:]] == [
        "broker-broker", "consumer-9091", "producer-8082"]
    # and each death and each restart is one log line: role, name, how, restart count, delay
    lines = [r.getMessage() for r in caplog.records if r.name == "zmqlab.supervisor"]
    assert lines[:3] == [
        "broker broker (pid 1000) died: signal SIGSEGV after 50.0 s; restart 1 in 0.5 s",
        "consumer 9091 (pid 1002) died: exit code 1 after 50.0 s; restart 1 in 0.5 s",
        "producer 8082 (pid 1006) died: signal SIGKILL after 50.0 s; restart 1 in 0.5 s"]
    assert lines[3:] == ["broker broker restarted (restart 1, pid 1007)",
                         "consumer 9091 restarted (restart 1, pid 1008)",
                         "producer 8082 restarted (restart 1, pid 1009)"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_the_snapshot_shows_pid_state_restarts_and_last_exit():
    # Given a consumer that was killed and restarted, and a producer waiting for its restart
    supervisor, _ = supervise(consumers=1, producers=1)
    consumer = supervisor.find("consumer", "9090")
    kill_and_time_restart(supervisor, consumer, 5.0)
    supervisor.find("producer", "8080").process.die(2)
    supervisor.step(7.0)
    # When the status endpoint takes a snapshot
    snap = supervisor.snapshot(now=7.25)
    # Then each node is there with what a user needs to see
    by_name = {n["name"]: n for n in snap["nodes"]}
    assert snap["pid"] == os.getpid() and snap["policy"]["max_deaths"] == 5
    assert by_name["9090"] | {"uptime_s": None} == {
        "role": "consumer", "name": "9090", "pid": consumer.process.pid, "state": "running",
        "restarts": 1, "last_exit": -9, "last_exit_text": "signal SIGKILL", "uptime_s": None,
        "restart_in_s": None}
    assert by_name["9090"]["uptime_s"] == pytest.approx(1.75)
    assert by_name["8080"]["state"] == "backoff" and by_name["8080"]["restart_in_s"] == 0.25
    assert by_name["8080"]["last_exit_text"] == "exit code 2"
    assert by_name["broker"]["restarts"] == 0 and by_name["broker"]["last_exit"] is None


def test_exits_are_described_by_code_or_signal():
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(None) == "no exit code"


def test_run_supervisor_drains_and_reports_a_child_that_keeps_dying():
    # Given a supervised topology whose consumer dies at once every time it starts
    world = World()

    def popen(argv: list[str], **options: Any) -> FakeProcess:
        process = world.popen(argv, **options)
        if "consumer" in argv:
            process.die(1)
        return process

    topology = Topology(producers=1, consumers=1)
    supervisor = Supervisor(topology, policy=RestartPolicy(initial_delay_s=0.01, max_deaths=3),
                            popen=popen)
    supervisor.wait_ready = lambda timeout_s: None  # fake processes answer nothing
    # When it runs until something ends it
    codes, failure = run_supervisor(supervisor, tick_s=0.01)
    # Then the supervisor gave up on the consumer after three deaths and stopped the rest
    assert failure == "consumer 9090 died 3 times within 60 s (last: exit code 1); giving up"
    assert codes == {"producer 8080": -signal.SIGTERM, "broker broker": -signal.SIGTERM,
                     "consumer 9090": 1}
    assert sum("consumer" in p.argv for p in world.started) == 3


def test_a_child_that_exits_while_starting_fails_the_start():
    world = World()

    def popen(argv: list[str], **options: Any) -> FakeProcess:
        process = world.popen(argv, **options)
        if "broker" in argv:
            process.die(1)
        return process

    supervisor = Supervisor(Topology(producers=0, consumers=0), popen=popen)
    with pytest.raises(ZmqlabError, match="broker broker exited with code 1"):
        supervisor.start(ready_timeout_s=5)
    assert supervisor.children == []


def test_children_are_started_in_their_own_session_knowing_their_supervisor():
    supervisor, world = supervise(consumers=0, producers=0)
    (broker,) = world.started
    assert broker.options["start_new_session"] is True
    assert broker.options["env"][PARENT_PID_ENV] == str(os.getpid())


# -- die_with_parent: real processes -----------------------------------------------------------
CHILD = """
import os, signal, sys
from zmqlab.topology import die_with_parent
die_with_parent()
print("ready", os.getpid(), os.getppid(), flush=True)
signal.pause()
"""

PARENT = f"""
import signal, sys
from zmqlab.topology import Supervisor, Topology
Supervisor(Topology()).spawn("test", "child", [sys.executable, "-c", {CHILD!r}])
signal.pause()
"""


def read_line(stream: Any, timeout_s: float) -> str:
    """One line from a pipe, or fail after ``timeout_s``."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    assert ready, f"no line within {timeout_s} s"
    return str(stream.readline())


def gone(pid: int) -> bool:
    """The process exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_exits_when_its_supervisor_is_killed_with_sigkill():
    # Given a supervisor process and the child it started, which has called die_with_parent
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, cwd=ROOT)
    child_pid = None
    try:
        assert parent.stdout is not None
        word, child, child_parent = read_line(parent.stdout, 30).split()
        child_pid = int(child)
        assert (word, int(child_parent)) == ("ready", parent.pid)
        # When the supervisor is killed with SIGKILL (it can run no cleanup at all)
        parent.kill()
        parent.wait(10)
        # Then the child exits on its own, within seconds
        wait_until(lambda: gone(child_pid), 10, "the child to exit after its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child_pid is not None and not gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)  # ours: started by the parent we started
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_child_whose_supervisor_died_before_it_could_watch_exits_at_once():
    # Given a supervisor that died before its child called die_with_parent (the child was
    # reparented, so its parent is no longer the pid it was given)
    dead = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
    dead.wait(30)
    env = dict(os.environ, **{PARENT_PID_ENV: str(dead.pid)})
    # When the child starts
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=ROOT)
    # Then it exits at once, saying why, without doing its work
    assert done.returncode == 1, done.stderr
    assert f"the supervisor (pid {dead.pid}) is gone" in done.stderr
    assert "ready" not in done.stdout


def test_without_a_supervisor_die_with_parent_changes_nothing(monkeypatch):
    from zmqlab import topology

    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    monkeypatch.setattr(topology, "_set_pdeathsig", lambda sig: pytest.fail("prctl called"))
    topology.die_with_parent()


def test_status_shows_disk_use_and_the_supervised_nodes():
    from rich.console import Console

    from zmqlab.render import human_bytes, render_status

    # Given a durable broker's snapshot and up's, where a consumer waits for its restart
    partitions = [{"partition": p, "depth": 5, "capacity": 100, "inflight": 0, "owner": "9090",
                   "target": "9090", "epoch": 1, "acked": 7, "disk_bytes": 3 * 1024 * 1024,
                   "segments": 2} for p in range(2)]
    supervisor, _ = supervise(consumers=1, producers=0)
    supervisor.find("consumer", "9090").process.die()
    supervisor.step(1.0)
    snap = {"uptime_s": 12, "ready": True, "waiting": None, "partitions": partitions,
            "consumers": [], "producers": [], "supervisor": supervisor.snapshot(now=1.25),
            "log": {"dir": "/data", "fsync": "batch", "segments": 2, "recovered": 40}}
    # When `zmqlab status` renders it
    console = Console(width=160, record=True)
    console.print(render_status(snap))
    text = console.export_text()
    # Then the partitions show their disk use, and the nodes table shows the restart
    assert "log /data — fsync batch, 2 segment(s), 40 record(s) recovered at start" in text
    assert "3.0 MiB" in text and "segs" in text
    assert "backoff (restart in 0.2 s)" in text and "signal SIGKILL" in text
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 1024 ** 3)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
