"""The ``zmqlab`` command line: parse options, build configs, call the library.

Errors a user can cause (bad options, unreachable endpoints, a database that cannot be opened)
end in one line on stderr and exit code 1 (2 for bad options), never a traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from zmqlab import logs
from zmqlab.assignment import format_table
from zmqlab.broker import Broker
from zmqlab.config import (
    DEFAULT_BACKEND,
    DEFAULT_DB_URL,
    DEFAULT_FRONTEND,
    REPLY_TIMEOUT_MS,
    BrokerConfig,
    ConsumerConfig,
    ProducerConfig,
)
from zmqlab.consumer import Consumer
from zmqlab.dashboard import producers_title
from zmqlab.errors import RecordsRefused, ZmqlabError
from zmqlab.node import Node, tune_gc
from zmqlab.producer import Producer
from zmqlab.protocol import parse_json
from zmqlab.topology import Supervisor, Topology, query_status

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="zmqlab: producers -> partitioned ZeroMQ broker -> consumers -> SQL.")
err = Console(stderr=True)
out = Console()

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
LogJson = Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line.")]
HeartbeatMs = Annotated[int, typer.Option("--heartbeat-ms", min=10,
                                          help="Heartbeat interval in milliseconds.")]
Liveness = Annotated[int, typer.Option("--liveness", min=1,
                                       help="Missed heartbeats before a peer is declared dead.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _setup_logs(level: str, as_json: bool) -> None:
    if level.lower() not in logs.LEVELS:
        raise typer.BadParameter(f"must be one of {', '.join(logs.LEVELS)}", param_hint="--log-level")
    logs.setup(level, as_json)


def _serve(node: Node) -> None:
    """Run a node until SIGINT/SIGTERM, then stop it gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    tune_gc()
    try:
        node.start()
    except ZmqlabError as exc:
        fail(str(exc))
    while node.alive and not stop.wait(0.25):
        pass
    node.stop()
    if node.error is not None:
        fail(f"{node.kind} failed: {node.error}")


def _config(build: Any, **kwargs: Any) -> Any:
    try:
        return build(**kwargs)
    except ZmqlabError as exc:
        fail(str(exc), 2)


@app.command()
def broker(
    frontend: Annotated[str, typer.Option(help="Producers' endpoint (ROUTER bind).")] = DEFAULT_FRONTEND,
    backend: Annotated[str, typer.Option(help="Consumers' endpoint (ROUTER bind).")] = DEFAULT_BACKEND,
    partitions: Annotated[int, typer.Option(min=1, help="Number of partitions.")] = 6,
    capacity: Annotated[int, typer.Option(min=1, help="Records each partition holds.")] = 10_000,
    expect_producers: Annotated[int, typer.Option(min=0, help="Refuse records until this many producers registered.")] = 0,
    expect_consumers: Annotated[int, typer.Option(min=0, help="Refuse records until this many consumers registered.")] = 0,
    put_wait_ms: Annotated[int, typer.Option(min=0, help="How long a PUT that does not fit waits for room before its records are refused PARTITION_FULL (0: refuse at once). Keep it under the producers' --timeout-ms.")] = 500,
    heartbeat_ms: HeartbeatMs = 1000,
    liveness: Liveness = 3,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Run the queue service (the broker)."""
    _setup_logs(log_level, log_json)
    config = _config(BrokerConfig, frontend=frontend, backend=backend, partitions=partitions,
                     capacity=capacity, expect_producers=expect_producers,
                     expect_consumers=expect_consumers, put_wait_ms=put_wait_ms,
                     heartbeat_ms=heartbeat_ms, liveness=liveness)
    _serve(Broker(config))


@app.command()
def producer(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Ingress port for clients.")] = 8080,
    host: Annotated[str, typer.Option(help="Interface to bind the ingress on.")] = "*",
    broker: Annotated[str, typer.Option(help="The broker's frontend.")] = "tcp://127.0.0.1:5555",
    name: Annotated[str | None, typer.Option(help="Producer name (default: the port).")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10, help="Broker reply timeout.")] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0, help="Reconnects before clients get UNAVAILABLE.")] = 3,
    heartbeat_ms: HeartbeatMs = 1000,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Run a producer service: clients PUT records on its port, it forwards them in batches."""
    from zmqlab.producer import ProducerService

    _setup_logs(log_level, log_json)
    config = _config(ProducerConfig, name=name or str(port), broker=broker,
                     ingress=f"tcp://{host}:{port}", timeout_ms=timeout_ms, retries=retries,
                     heartbeat_ms=heartbeat_ms)
    _serve(ProducerService(config))


@app.command()
def consumer(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Identity and status port.")] = 9090,
    host: Annotated[str, typer.Option(help="Interface to bind the status port on.")] = "*",
    broker: Annotated[str, typer.Option(help="The broker's backend.")] = "tcp://127.0.0.1:5556",
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy database URL.")] = DEFAULT_DB_URL,
    credit: Annotated[int, typer.Option(min=1, help="Records this consumer may hold at once.")] = 10_000,
    max_attempts: Annotated[int, typer.Option(min=1, help="Deliveries before a dead letter.")] = 5,
    transform: Annotated[str | None, typer.Option(help="package.module:function run on each payload before it is stored; raising fails the record.")] = None,
    heartbeat_ms: HeartbeatMs = 1000,
    liveness: Liveness = 3,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Run a consumer: owns partitions, stores their records in SQL, then acknowledges."""
    _setup_logs(log_level, log_json)
    config = _config(ConsumerConfig, name=str(port), broker=broker, status=f"tcp://{host}:{port}",
                     db_url=db, credit=credit, max_attempts=max_attempts, transform=transform,
                     heartbeat_ms=heartbeat_ms, liveness=liveness)
    try:
        node = Consumer(config)
    except ZmqlabError as exc:
        fail(str(exc), 2)
    _serve(node)


@app.command()
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
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy database URL.")] = DEFAULT_DB_URL,
    heartbeat_ms: HeartbeatMs = 1000,
    log_level: LogLevel = "info",
    log_json: LogJson = False,
) -> None:
    """Start the seed topology (broker, producers, consumers) as processes until Ctrl-C."""
    _setup_logs(log_level, log_json)
    topology = Topology(host=host, frontend_port=frontend_port, backend_port=backend_port,
                        producers=producers, producer_port=producer_port, consumers=consumers,
                        consumer_port=consumer_port, partitions=partitions, capacity=capacity,
                        db_url=db, heartbeat_ms=heartbeat_ms, log_level=log_level,
                        log_json=log_json)
    supervisor = Supervisor(topology)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        supervisor.start()
    except ZmqlabError as exc:
        fail(str(exc))
    out.print(f"broker    frontend {topology.frontend}  backend {topology.backend}  "
              f"partitions {partitions}", highlight=False)
    for endpoint in topology.producer_endpoints():
        out.print(f"producer  {endpoint}", highlight=False)
    for endpoint in topology.consumer_endpoints():
        out.print(f"consumer  {endpoint}  -> {db}", highlight=False)
    out.print("ready: zmqlab send '{\"hello\": \"world\"}'  |  zmqlab status  |  Ctrl-C stops",
              highlight=False)
    sys.stdout.flush()
    failure = None
    while not stop.wait(0.5):
        try:
            supervisor.check_alive()
        except ZmqlabError as exc:
            failure = str(exc)
            break
    codes = supervisor.stop()
    out.print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), highlight=False)
    if failure:
        fail(failure)


@app.command()
def send(
    payload: Annotated[str, typer.Argument(help="The record: a JSON object.")],
    to: Annotated[str, typer.Option(help="A producer service (or the broker's frontend).")] = "tcp://127.0.0.1:8080",
    key: Annotated[str | None, typer.Option(help="Partition key (same key, same partition).")] = None,
    id: Annotated[str | None, typer.Option("--id", help="Record id (default: a new UUID).")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10)] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0)] = 2,
) -> None:
    """Send one record and print its acknowledgement."""
    try:
        data = parse_json(payload.encode(errors="surrogateescape"))
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="PAYLOAD") from None
    if not isinstance(data, dict):
        raise typer.BadParameter("the record must be a JSON object, like '{\"a\": 1}'",
                                 param_hint="PAYLOAD")
    try:
        with Producer(to, timeout_ms=timeout_ms, retries=retries) as client:
            ack = client.send(data, key=key, id=id)
    except RecordsRefused as exc:
        fail(f"refused: {exc}")
    except ZmqlabError as exc:
        fail(str(exc))
    dup = " duplicate" if ack.duplicate else ""
    out.print(f"acked id={ack.id} partition={ack.partition} (Q{ack.partition + 1}) "
              f"offset={ack.offset}{dup}", highlight=False)


@app.command()
def status(
    broker: Annotated[str, typer.Option(help="The broker's frontend.")] = "tcp://127.0.0.1:5555",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw snapshot as JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="A live dashboard, refreshed every second.")] = False,
    for_s: Annotated[float | None, typer.Option("--for", min=0.0, help="With --watch: stop after this many seconds.")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10)] = 1500,
) -> None:
    """Show partitions (depth, in flight, owner, epoch), consumers and producers."""
    if watch:
        if as_json:
            raise typer.BadParameter("--watch shows a dashboard; use --json without it",
                                     param_hint="--json")
        from zmqlab.cli_load import watch as watch_command

        watch_command(broker=broker, interval=1.0, for_s=for_s)
        return
    try:
        snap = query_status(broker, timeout_ms=timeout_ms)
    except ZmqlabError as exc:
        fail(f"broker unreachable at {broker}: {exc}")
    if as_json:
        out.print_json(data=snap)
        return
    out.print(render_status(snap))


def render_status(snap: dict[str, Any]) -> Table:
    table = Table(title=f"zmqlab broker — up {snap['uptime_s']:.0f} s"
                        + ("" if snap["ready"] else f" — NOT READY: {snap['waiting']}"))
    for column in ("partition", "depth", "capacity", "in flight", "owner", "epoch", "acked"):
        table.add_column(column, justify="right")
    for p in snap["partitions"]:
        owner = p["owner"] or "-"
        if p["target"] != p["owner"]:
            owner += f" -> {p['target'] or '-'}"
        table.add_row(f"Q{p['partition'] + 1}", str(p["depth"]), str(p["capacity"]),
                      str(p["inflight"]), owner, str(p["epoch"]), str(p["acked"]))
    grid = Table.grid(padding=(1, 0))
    grid.add_row(table)
    consumers = Table(title="consumers")
    for column in ("consumer", "partitions", "in flight", "acked", "last seen"):
        consumers.add_column(column)
    for c in snap["consumers"]:
        consumers.add_row(c["name"], " ".join(f"Q{p + 1}" for p in c["partitions"]) or "-",
                          str(c["inflight"]), str(c["acked"]), f"{c['last_seen_s']:.1f} s ago")
    grid.add_row(consumers)
    producers = Table(title=producers_title(snap))
    for column in ("producer", "records", "last seen"):
        producers.add_column(column)
    for pr in snap["producers"]:
        producers.add_row(pr["name"], str(pr["records"]), f"{pr['last_seen_s']:.1f} s ago")
    grid.add_row(producers)
    return grid


@app.command()
def assign(
    partitions: Annotated[int, typer.Option(min=1, help="Number of partitions.")] = 6,
    consumers: Annotated[int, typer.Option(min=1, help="Number of consumers.")] = 3,
    consumer_port: Annotated[int, typer.Option(min=1, max=65535, help="First consumer port.")] = 9090,
) -> None:
    """Print the round-robin assignment table (Q4 -> consumer-1 …)."""
    for line in format_table(partitions, [str(consumer_port + i) for i in range(consumers)]):
        out.print(line, highlight=False)


dead_app = typer.Typer(no_args_is_help=True,
                       help="Dead letters: records that failed --max-attempts times.")
app.add_typer(dead_app, name="dead")


@dead_app.command("list")
def dead_list(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy database URL.")] = DEFAULT_DB_URL,
    id: Annotated[list[str] | None, typer.Option("--id", help="Only these ids (repeatable).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Show dead letters: id, partition, attempts, last error, payload."""
    from zmqlab.deadletters import list_dead

    try:
        rows = list_dead(db, id or (), limit)
    except ZmqlabError as exc:
        fail(str(exc))
    if as_json:
        out.print_json(data=rows, default=str)
        return
    table = Table(title=f"{len(rows)} dead letter(s) in {db}")
    for column in ("id", "partition", "offset", "key", "attempts", "failed at", "last error",
                   "payload"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["id"], f"Q{r['partition'] + 1}", str(r["offset"]), r["key"] or "-",
                      str(r["attempts"]), str(r["failed_at"])[:19], r["last_error"],
                      r["payload"][:200])
    out.print(table)


@dead_app.command("replay")
def dead_replay(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy database URL.")] = DEFAULT_DB_URL,
    to: Annotated[str, typer.Option(help="A producer service (or the broker's frontend).")] = "tcp://127.0.0.1:8080",
    id: Annotated[list[str] | None, typer.Option("--id", help="Only these ids (repeatable).")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10)] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0)] = 3,
) -> None:
    """Put dead letters back in the queue (all, or --id ones); each is deleted once acked."""
    from zmqlab.deadletters import replay

    try:
        report = replay(db, to, id or (), timeout_ms=timeout_ms, retries=retries)
    except ZmqlabError as exc:
        fail(str(exc))
    for ack in report.replayed:
        out.print(f"replayed id={ack.id} partition={ack.partition} (Q{ack.partition + 1}) "
                  f"offset={ack.offset}", highlight=False)
    for refusal in report.refused:
        err.print(f"refused id={refusal.id}: {refusal.code} {refusal.reason}", highlight=False)
    for missing in report.missing:
        err.print(f"not a dead letter: {missing}", highlight=False)
    out.print(f"{len(report.replayed)} replayed, {len(report.refused)} refused, "
              f"{len(report.missing)} not found", highlight=False)
    if report.refused or report.missing:
        raise typer.Exit(1)


def main() -> None:
    app()


# Commands that live in their own modules (load generator, demo, live status).
from zmqlab import cli_load  # noqa: E402

cli_load.register(app)
