"""``broker``, ``producer``, ``consumer`` and ``up``: run nodes in this process until a signal.

Each node's module is imported inside its command, so ``zmqlab broker`` and ``zmqlab producer``
never load the consumer's SQLAlchemy.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from zmqlab.cli._common import (
    DbUrl,
    HeartbeatMs,
    Liveness,
    LogJson,
    LogLevel,
    build,
    fail,
    failing,
    out,
    setup_logs,
)
from zmqlab.config import (
    DEFAULT_BACKEND,
    DEFAULT_DB_URL,
    DEFAULT_FRONTEND,
    FSYNC_MODES,
    REPLY_TIMEOUT_MS,
    BrokerConfig,
    ConsumerConfig,
    ProducerConfig,
)
from zmqlab.exposure import check_exposure
from zmqlab.protocol import MAX_FRAME_BYTES

Insecure = Annotated[bool, typer.Option(
    "--insecure", help="Allow binding other than loopback (127.0.0.1, ::1) although nothing "
    "authenticates peers yet: anyone who can reach the port gets in.")]


def _die_with_parent() -> None:
    """``topology.die_with_parent``: a node started by ``zmqlab up`` ends with it."""
    from zmqlab.topology import die_with_parent

    die_with_parent()


def broker(
    frontend: Annotated[str, typer.Option(help="Producers' endpoint (ROUTER bind).")] = DEFAULT_FRONTEND,
    backend: Annotated[str, typer.Option(help="Consumers' endpoint (ROUTER bind).")] = DEFAULT_BACKEND,
    partitions: Annotated[int, typer.Option(min=1, help="Number of partitions.")] = 6,
    capacity: Annotated[int, typer.Option(min=1, help="Records each partition holds.")] = 10_000,
    expect_producers: Annotated[int, typer.Option(min=0, help="Refuse records until this many producers registered.")] = 0,
    expect_consumers: Annotated[int, typer.Option(min=0, help="Refuse records until this many consumers registered.")] = 0,
    put_wait_ms: Annotated[int, typer.Option(min=0, help="How long a PUT that does not fit waits for room before its records are refused PARTITION_FULL (0: refuse at once). Keep it under the producers' --timeout-ms.")] = 500,
    ack_timeout_ms: Annotated[int, typer.Option(min=10, help="Records in flight this long at one consumer are released and delivered again.")] = 30_000,
    data_dir: Annotated[str | None, typer.Option(help="Keep a write-ahead log here: every acknowledged record survives a crash and is delivered after a restart (default: records are kept in memory only).")] = None,
    fsync: Annotated[str, typer.Option(help="With --data-dir: batch (acknowledge after the log is on disk), interval (flush every --fsync-interval-ms, acknowledge at once) or off (the kernel decides).")] = "batch",
    fsync_interval_ms: Annotated[int, typer.Option(min=1, help="With --fsync interval: how often the log is flushed.")] = 1000,
    heartbeat_ms: HeartbeatMs = 1000,
    liveness: Liveness = 3,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Run the queue service (the broker)."""
    _die_with_parent()  # a no-op unless `zmqlab up` started this process
    from zmqlab.broker import Broker
    from zmqlab.runner import run_node

    setup_logs(log_level, log_json)
    config = build(BrokerConfig, frontend=frontend, backend=backend, partitions=partitions,
                   capacity=capacity, expect_producers=expect_producers,
                   expect_consumers=expect_consumers, put_wait_ms=put_wait_ms,
                   ack_timeout_ms=ack_timeout_ms, data_dir=data_dir, fsync=fsync,
                   fsync_interval_ms=fsync_interval_ms, heartbeat_ms=heartbeat_ms,
                   liveness=liveness, insecure=insecure)
    with failing():  # recovering the log can fail: exit 1, one line
        run_node(Broker(config))


def producer(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Ingress port for clients.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind the ingress on (other than loopback: with --insecure).")] = "127.0.0.1",
    broker: Annotated[str, typer.Option(help="The broker's frontend.")] = "tcp://127.0.0.1:5555",
    name: Annotated[str | None, typer.Option(help="Producer name (default: the port).")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10, help="Broker reply timeout.")] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0, help="Reconnects before clients get UNAVAILABLE.")] = 3,
    max_pending_bytes: Annotated[int, typer.Option(min=MAX_FRAME_BYTES, help="Payload bytes waiting for the broker before clients' PUTs are refused UNAVAILABLE (retryable); at least one frame.")] = 256 * 1_048_576,
    heartbeat_ms: HeartbeatMs = 1000,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Run a producer service: clients PUT records on its port, it forwards them in batches."""
    _die_with_parent()  # a no-op unless `zmqlab up` started this process
    from zmqlab.producer import ProducerService
    from zmqlab.runner import run_node

    setup_logs(log_level, log_json)
    config = build(ProducerConfig, name=name or str(port), broker=broker,
                   ingress=f"tcp://{host}:{port}", timeout_ms=timeout_ms, retries=retries,
                   max_pending_bytes=max_pending_bytes, heartbeat_ms=heartbeat_ms,
                   insecure=insecure)
    with failing():
        run_node(ProducerService(config))


def consumer(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Identity and status port.")] = 9090,
    host: Annotated[str, typer.Option(help="Address to bind the status port on (other than loopback: with --insecure).")] = "127.0.0.1",
    broker: Annotated[str, typer.Option(help="The broker's backend.")] = "tcp://127.0.0.1:5556",
    db: DbUrl = DEFAULT_DB_URL,
    credit: Annotated[int, typer.Option(min=1, help="Records this consumer may hold at once.")] = 10_000,
    max_attempts: Annotated[int, typer.Option(min=1, help="Deliveries before a dead letter.")] = 5,
    transform: Annotated[str | None, typer.Option(help="package.module:function run on each payload before it is stored; raising fails the record.")] = None,
    heartbeat_ms: HeartbeatMs = 1000,
    liveness: Liveness = 3,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Run a consumer: owns partitions, stores their records in SQL, then acknowledges."""
    _die_with_parent()  # a no-op unless `zmqlab up` started this process
    from zmqlab.consumer import Consumer
    from zmqlab.runner import run_node

    setup_logs(log_level, log_json)
    config = build(ConsumerConfig, name=str(port), broker=broker, status=f"tcp://{host}:{port}",
                   db_url=db, credit=credit, max_attempts=max_attempts, transform=transform,
                   heartbeat_ms=heartbeat_ms, liveness=liveness, insecure=insecure)
    node = build(Consumer, config)  # checks the database URL and the transform: bad options
    with failing():
        run_node(node)


def up(
    producers: Annotated[int, typer.Option(min=0, help="Producer services.")] = 3,
    producer_port: Annotated[int, typer.Option(min=1, max=65535, help="First producer port.")] = 8080,
    consumers: Annotated[int, typer.Option(min=0, help="Consumers.")] = 3,
    consumer_port: Annotated[int, typer.Option(min=1, max=65535, help="First consumer port.")] = 9090,
    partitions: Annotated[int, typer.Option(min=1)] = 6,
    capacity: Annotated[int, typer.Option(min=1)] = 10_000,
    frontend_port: Annotated[int, typer.Option(min=1, max=65535)] = 5555,
    backend_port: Annotated[int, typer.Option(min=1, max=65535)] = 5556,
    host: Annotated[str, typer.Option(help="Address every node binds and connects on.")] = "127.0.0.1",
    db: DbUrl = DEFAULT_DB_URL,
    data_dir: Annotated[str, typer.Option(help="The broker's write-ahead log (relative to the working directory): every acknowledged record survives a crash of the broker and is delivered after its restart.")] = "zmqlab-data",
    memory: Annotated[bool, typer.Option("--memory", help="Keep records in the broker's memory only (no --data-dir): a broker that dies loses what it held.")] = False,
    fsync: Annotated[str, typer.Option(help="The broker's --fsync: batch (acknowledge after the log is on disk), interval or off.")] = "batch",
    status_port: Annotated[int, typer.Option(min=1, max=65535, help="Answer `zmqlab status` about every node (pid, state, restarts) on this port of --host.")] = 5557,
    restart_limit: Annotated[int, typer.Option(min=1, help="A node that dies this many times within --restart-window is not restarted again: everything stops and up exits 1.")] = 5,
    restart_window: Annotated[float, typer.Option(min=1.0, help="Seconds over which --restart-limit counts a node's deaths.")] = 60.0,
    heartbeat_ms: HeartbeatMs = 1000,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Start the seed topology (broker, producers, consumers) as processes and supervise it
    until Ctrl-C: a node that dies is restarted (backoff from 0.5 s, doubling up to 30 s)."""
    import os

    from zmqlab.runner import run_supervisor
    from zmqlab.topology import RestartPolicy, Supervisor, Topology

    setup_logs(log_level, log_json)
    if fsync not in FSYNC_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(FSYNC_MODES)}", param_hint="--fsync")
    status = f"tcp://{host}:{status_port}"
    build(check_exposure, status, insecure=insecure, what="status")  # every node binds --host
    wal_dir = None if memory else os.path.abspath(data_dir)
    topology = Topology(host=host, frontend_port=frontend_port, backend_port=backend_port,
                        producers=producers, producer_port=producer_port, consumers=consumers,
                        consumer_port=consumer_port, partitions=partitions, capacity=capacity,
                        db_url=db, heartbeat_ms=heartbeat_ms, log_level=log_level,
                        log_json=log_json, data_dir=wal_dir, fsync=fsync, insecure=insecure)
    policy = RestartPolicy(max_deaths=restart_limit, window_s=restart_window)

    def say(line: str) -> None:
        out.print(line, highlight=False, soft_wrap=True)  # one line each, whatever the width

    def ready() -> None:
        say(f"broker    frontend {topology.frontend}  backend {topology.backend}  "
            f"partitions {partitions}")
        say("log       in memory only (--memory)" if wal_dir is None
            else f"log       {wal_dir} (fsync {fsync})")
        for endpoint in topology.producer_endpoints():
            say(f"producer  {endpoint}")
        for endpoint in topology.consumer_endpoints():
            say(f"consumer  {endpoint}  -> {db}")
        say(f"status    {status}")
        say(f"restarts  a dead node after {policy.initial_delay_s:g} s, doubling up to "
            f"{policy.max_delay_s:g} s; one that dies {restart_limit} times within "
            f"{restart_window:g} s stops everything")
        say("ready: zmqlab send '{\"hello\": \"world\"}'  |  zmqlab status  |  Ctrl-C stops")
        sys.stdout.flush()

    with failing():
        codes, failure = run_supervisor(Supervisor(topology, policy=policy), on_ready=ready,
                                        status_endpoint=status)
    say("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()))
    if failure:
        fail(failure)
