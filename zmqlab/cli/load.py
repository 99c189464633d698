"""``load`` and ``demo``: send a load through the fabric and print the verdict.

``zmqlab.demo`` runs them (and, for the demo, owns the processes' lifetime); this module only
prints. Both exit 1 when anything was refused, left unacknowledged, lost or stored twice.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from zmqlab.cli._common import DbUrl, build, err, failing, out
from zmqlab.config import DEFAULT_DB_URL, REPLY_TIMEOUT_MS

DEFAULT_ENDPOINTS = "tcp://127.0.0.1:8080,8081,8082"  # as zmqlab.loadgen's, without importing it


def load(
    to: Annotated[str, typer.Option(help="Producer services, comma-separated; bare ports reuse the previous host.")] = DEFAULT_ENDPOINTS,
    records: Annotated[int, typer.Option(min=0, help="Records to send.")] = 10_000,
    rate: Annotated[float, typer.Option(min=0, help="Records/s over all clients; 0 = as fast as acks allow.")] = 0.0,
    size: Annotated[int, typer.Option(min=2, help="Payload bytes (a JSON object padded to this size).")] = 200,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients (connections, served by one thread).")] = 6,
    keys: Annotated[int, typer.Option(min=0, help="Spread records over this many keys; 0 = no key.")] = 0,
    deadline: Annotated[float, typer.Option(min=0.01, help="Stop sending after this many seconds.")] = 60.0,
    batch: Annotated[int, typer.Option(min=1, help="Records per request from one client.")] = 50,
    window: Annotated[int, typer.Option(min=1, help="Requests in flight per client (1 = wait for each answer).")] = 4,
    timeout_ms: Annotated[int, typer.Option(min=10, help="Reply timeout per try.")] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0, help="Resends per endpoint before failing over.")] = 2,
    verify_db: Annotated[str | None, typer.Option("--verify", help="Database URL: check that every acknowledged record was stored once.")] = None,
    verify_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for the database to catch up.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Send records through the producer services and report throughput, latency and losses.

    Exits 1 when anything was refused, left unacknowledged, lost or stored twice.
    """
    from zmqlab.demo import load_and_verify, load_options
    from zmqlab.render import LoadProgress, report_table, verdict
    from zmqlab.runner import sigterm_as_interrupt

    options = build(load_options, to, records=records, rate=rate, size=size, clients=clients,
                    keys=keys, deadline_s=deadline, batch=batch, window=window,
                    timeout_ms=timeout_ms, retries=retries)
    progress = None if as_json else LoadProgress(options.records, err)
    with failing(), sigterm_as_interrupt():
        report = load_and_verify(options, verify_db, verify_timeout, progress)
    if as_json:
        print(report.dumps(), flush=True)
    else:
        out.print(report_table(report))
    failure = verdict(report)
    if failure:
        err.print(f"[bold red]FAILED:[/bold red] {failure}", highlight=False)
        raise typer.Exit(1)


def demo(
    records: Annotated[int, typer.Option(min=1, help="Records to send.")] = 20_000,
    db: DbUrl = DEFAULT_DB_URL,
    producers: Annotated[int, typer.Option(min=1, help="Producer services.")] = 3,
    producer_port: Annotated[int, typer.Option(min=1, max=65535, help="First producer port.")] = 8080,
    consumers: Annotated[int, typer.Option(min=1, help="Consumers.")] = 3,
    consumer_port: Annotated[int, typer.Option(min=1, max=65535, help="First consumer port.")] = 9090,
    frontend_port: Annotated[int, typer.Option(min=1, max=65535)] = 5555,
    backend_port: Annotated[int, typer.Option(min=1, max=65535)] = 5556,
    partitions: Annotated[int, typer.Option(min=1)] = 6,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent load clients.")] = 6,
    size: Annotated[int, typer.Option(min=2, help="Payload bytes.")] = 200,
    keys: Annotated[int, typer.Option(min=0, help="Keys to spread records over; 0 = none.")] = 0,
    deadline: Annotated[float, typer.Option(min=1, help="Seconds the load may take.")] = 40.0,
    verify_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the database.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (no progress bar).")] = False,
) -> None:
    """Start the seed topology, send a load through it, prove it is all in the database, stop.

    Every process it starts is stopped at the end, also on Ctrl-C; exit 1 if anything was lost.
    """
    from zmqlab.demo import load_options, run_demo
    from zmqlab.render import LoadProgress, report_table, summary_tables
    from zmqlab.topology import Topology

    topology = Topology(frontend_port=frontend_port, backend_port=backend_port,
                        producers=producers, producer_port=producer_port, consumers=consumers,
                        consumer_port=consumer_port, partitions=partitions, db_url=db)
    options = build(load_options, ",".join(topology.producer_endpoints()), records=records,
                    clients=clients, size=size, keys=keys, deadline_s=deadline)

    def say(line: str) -> None:
        if not as_json:
            err.print(line, highlight=False)

    result = run_demo(topology, options, verify_timeout, say=say,
                      progress=None if as_json else LoadProgress(records, err))
    report = result.report
    if as_json and report is not None:
        print(json.dumps(result.to_json(), separators=(",", ":")), flush=True)
    elif report is not None:
        out.print(report_table(report))
        if result.snapshot is not None and report.verified is not None:
            for table in summary_tables(result.snapshot, report.verified.by_consumer):
                out.print(table)
    if result.failure is not None:
        err.print(f"children's logs are in {result.log_dir}", highlight=False)
        for name, text in [] if result.interrupted else result.log_tails():
            err.print(f"[bold]--- {name} (last lines)[/bold]\n{text}", highlight=False,
                      markup=False)
        err.print(f"[bold red]DEMO FAILED:[/bold red] {result.failure}", highlight=False)
        raise typer.Exit(1)
    if not as_json:
        out.print(f"[bold green]OK[/bold green]: {report.acked if report else 0} records "
                  f"acknowledged and stored exactly once in {db}", highlight=False)
