"""CLI commands ``load``, ``demo`` and ``watch``, registered onto the main Typer app.

They parse options and call the library (``zmqlab.loadgen``, ``zmqlab.dashboard``,
``zmqlab.topology``); the only logic here is presentation and the demo's process lifetime,
which must end with every started process stopped, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import (
    Progress as Bar,
)
from rich.table import Table

from zmqlab.config import DEFAULT_DB_URL, REPLY_TIMEOUT_MS
from zmqlab.errors import ConfigError, ZmqlabError
from zmqlab.loadgen import (
    DEFAULT_ENDPOINTS,
    LoadOptions,
    LoadReport,
    Progress,
    parse_endpoints,
    run_load,
    verify,
)
from zmqlab.node import tune_gc

err = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so ``finally`` blocks stop what we started."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[Progress], None] | None]:
    """A rich progress bar on stderr with acked/s and errors; ``None`` when disabled."""
    if not enabled:
        yield None
        return
    bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[rate]:>9} acked/s"),
              TextColumn("[red]{task.fields[errors]} errors[/red]"),
              TextColumn("{task.fields[retried]} retries"),
              TimeElapsedColumn(), console=err, transient=False)
    task = bar.add_task("load", total=total, rate="-", errors=0, retried=0)
    window: list[tuple[float, int]] = []

    def update(p: Progress) -> None:
        window.append((p.elapsed_s, p.acked))
        while len(window) > 2 and p.elapsed_s - window[0][0] > 1.0:
            window.pop(0)  # acked/s over about the last second
        (t0, a0), (t1, a1) = window[0], window[-1]
        rate = f"{(a1 - a0) / (t1 - t0):,.0f}" if t1 > t0 else "-"
        bar.update(task, completed=p.acked + p.refused, rate=rate, errors=p.refused,
                   retried=p.retried)

    with bar:
        yield update


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def report_table(report: LoadReport) -> Table:
    """The final report as a two-column table."""
    data = report.to_json()
    table = Table(title="load report", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("records", str(report.records))
    table.add_row("sent", str(report.sent))
    table.add_row("acknowledged", str(report.acked))
    table.add_row("unacknowledged", str(report.unacked))
    table.add_row("retried", str(report.retried))
    table.add_row("refused", str(report.refused))
    for code, entry in report.refusals.items():
        table.add_row(f"  {code}", f"{entry['count']}: {entry['reason'][:90]}")
    table.add_row("seconds", f"{report.seconds:.2f}")
    table.add_row("throughput", f"{report.throughput_rps:,.0f} records/s")
    table.add_row("ack latency p50 / p90", f"{_ms(data['ack_p50_ms'])} / {_ms(data['ack_p90_ms'])}")
    table.add_row("ack latency p99 / max", f"{_ms(data['ack_p99_ms'])} / {_ms(data['ack_max_ms'])}")
    v = report.verified
    if v is not None:
        table.add_row("persisted", f"{v.persisted} of {v.expected} acknowledged")
        table.add_row("lost", str(v.lost), style="bold red" if v.lost else "")
        table.add_row("duplicates", str(v.duplicates), style="bold red" if v.duplicates else "")
        if v.dead_lettered:
            table.add_row("dead-lettered", str(v.dead_lettered), style="bold red")
        if v.unexpected:
            table.add_row("stored, not acknowledged", str(v.unexpected))
        table.add_row("end-to-end throughput", f"{v.throughput_rps:,.0f} records/s "
                      f"(over {v.span_s:.2f} s)")
        table.add_row("end-to-end p50 / p90",
                      f"{_ms(data['e2e_p50_ms'])} / {_ms(data['e2e_p90_ms'])}")
        table.add_row("end-to-end p99 / max",
                      f"{_ms(data['e2e_p99_ms'])} / {_ms(data['e2e_max_ms'])}")
        if v.timed_out:
            table.add_row("verify", f"timed out after {v.waited_s:.1f} s", style="bold red")
    if report.interrupted:
        table.add_row("interrupted", "yes", style="yellow")
    return table


def _verdict(report: LoadReport) -> str | None:
    """Why the run failed, in one line, or None."""
    v = report.verified
    problems = []
    if v is not None and v.lost:
        sample = ", ".join(v.missing_sample[:3])
        problems.append(f"{v.lost} acknowledged record(s) LOST (e.g. {sample})")
    if v is not None and v.duplicates:
        problems.append(f"{v.duplicates} record(s) stored twice")
    if v is not None and v.dead_lettered:
        problems.append(f"{v.dead_lettered} record(s) dead-lettered")
    if report.refused:
        problems.append(f"{report.refused} record(s) refused ("
                        + ", ".join(f"{c}: {e['count']}" for c, e in report.refusals.items())
                        + ")")
    if report.unacked:
        problems.append(f"{report.unacked} record(s) not acknowledged")
    if report.interrupted:
        problems.append("interrupted")
    return "; ".join(problems) or None


def _options(**kwargs: Any) -> LoadOptions:
    try:
        kwargs["endpoints"] = tuple(parse_endpoints(kwargs["endpoints"]))
        return LoadOptions(**kwargs)
    except ConfigError as exc:
        _fail(str(exc), 2)


# -- load --------------------------------------------------------------------------------------
def load(
    to: Annotated[str, typer.Option(help="Producer services, comma-separated; bare ports reuse the previous host.")] = DEFAULT_ENDPOINTS,  # noqa: E501
    records: Annotated[int, typer.Option(min=0, help="Records to send.")] = 10_000,
    rate: Annotated[float, typer.Option(min=0, help="Records/s over all clients; 0 = as fast as acks allow.")] = 0.0,  # noqa: E501
    size: Annotated[int, typer.Option(min=2, help="Payload bytes (a JSON object padded to this size).")] = 200,  # noqa: E501
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients (connections, served by one thread).")] = 6,  # noqa: E501
    keys: Annotated[int, typer.Option(min=0, help="Spread records over this many keys; 0 = no key.")] = 0,  # noqa: E501
    deadline: Annotated[float, typer.Option(min=0.01, help="Stop sending after this many seconds.")] = 60.0,  # noqa: E501
    batch: Annotated[int, typer.Option(min=1, help="Records per request from one client.")] = 50,
    window: Annotated[int, typer.Option(min=1, help="Requests in flight per client (1 = wait for each answer).")] = 4,  # noqa: E501
    timeout_ms: Annotated[int, typer.Option(min=10, help="Reply timeout per try.")] = REPLY_TIMEOUT_MS,  # noqa: E501
    retries: Annotated[int, typer.Option(min=0, help="Resends per endpoint before failing over.")] = 2,  # noqa: E501
    verify_db: Annotated[str | None, typer.Option("--verify", help="Database URL: check that every acknowledged record was stored once.")] = None,  # noqa: E501
    verify_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for the database to catch up.")] = 30.0,  # noqa: E501
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,  # noqa: E501
) -> None:
    """Send records through the producer services and report throughput, latency and losses.

    Exits 1 when anything was refused, left unacknowledged, lost or stored twice.
    """
    options = _options(endpoints=to, records=records, rate=rate, size=size, clients=clients,
                       keys=keys, deadline_s=deadline, batch=batch, window=window,
                       timeout_ms=timeout_ms, retries=retries)
    tune_gc()
    with _sigterm_as_interrupt():
        with _progress_bar(options.records, not as_json) as progress:
            report = run_load(options, progress=progress)
        if verify_db is not None and not report.interrupted:
            try:
                acked = report.acked_ids()
                report.verified = verify(verify_db, acked.keys(), acked, verify_timeout,
                                         prefix=report.prefix)
            except KeyboardInterrupt:
                report.interrupted = True
            except ZmqlabError as exc:
                _fail(f"cannot verify {verify_db}: {exc}")
    if as_json:
        print(report.dumps(), flush=True)
    else:
        out.print(report_table(report))
    verdict = _verdict(report)
    if verdict:
        err.print(f"[bold red]FAILED:[/bold red] {verdict}", highlight=False)
        raise typer.Exit(1)


# -- demo --------------------------------------------------------------------------------------
def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as handle:
            return b"\n".join(handle.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return ""


def _print_logs(log_dir: str) -> None:
    err.print(f"children's logs are in {log_dir}", highlight=False)
    for name in sorted(os.listdir(log_dir)):
        text = _tail(os.path.join(log_dir, name))
        if text.strip():
            err.print(f"[bold]--- {name} (last lines)[/bold]\n{text}", highlight=False,
                      markup=False)


def summary_tables(snap: dict[str, Any], stored_by_consumer: dict[str, int]) -> list[Table]:
    """Per-partition and per-consumer summary of the broker's snapshot and the database."""
    partitions = Table(title="partitions", title_justify="left")
    for column in ("partition", "owner", "epoch", "appended", "acked", "depth", "released"):
        partitions.add_column(column, justify="right")
    for p in snap["partitions"]:
        partitions.add_row(f"Q{p['partition'] + 1}", p["owner"] or "-", str(p["epoch"]),
                           str(p["appended"]), str(p["acked"]), str(p["depth"]),
                           str(p.get("released", 0)))
    consumers = Table(title="consumers", title_justify="left")
    for column in ("consumer", "partitions", "delivered", "acked", "stored (this run)"):
        consumers.add_column(column, justify="right")
    for c in snap["consumers"]:
        consumers.add_row(c["name"], " ".join(f"Q{p + 1}" for p in c["partitions"]) or "-",
                          str(c["delivered"]), str(c["acked"]),
                          str(stored_by_consumer.get(c["name"], 0)))
    return [partitions, consumers]


def demo(
    records: Annotated[int, typer.Option(min=1, help="Records to send.")] = 20_000,
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy database URL.")] = DEFAULT_DB_URL,
    producers: Annotated[int, typer.Option(min=1, help="Producer services.")] = 3,
    producer_port: Annotated[int, typer.Option(min=1, max=65535, help="First producer port.")] = 8080,  # noqa: E501
    consumers: Annotated[int, typer.Option(min=1, help="Consumers.")] = 3,
    consumer_port: Annotated[int, typer.Option(min=1, max=65535, help="First consumer port.")] = 9090,  # noqa: E501
    frontend_port: Annotated[int, typer.Option(min=1, max=65535)] = 5555,
    backend_port: Annotated[int, typer.Option(min=1, max=65535)] = 5556,
    partitions: Annotated[int, typer.Option(min=1)] = 6,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent load clients.")] = 6,
    size: Annotated[int, typer.Option(min=2, help="Payload bytes.")] = 200,
    keys: Annotated[int, typer.Option(min=0, help="Keys to spread records over; 0 = none.")] = 0,
    deadline: Annotated[float, typer.Option(min=1, help="Seconds the load may take.")] = 40.0,
    verify_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the database.")] = 30.0,  # noqa: E501
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (no progress bar).")] = False,  # noqa: E501
) -> None:
    """Start the seed topology, send a load through it, prove it is all in the database, stop.

    Every process it starts is stopped at the end, also on Ctrl-C; exit 1 if anything was lost.
    """
    from zmqlab.topology import Supervisor, Topology, query_status

    topology = Topology(frontend_port=frontend_port, backend_port=backend_port,
                        producers=producers, producer_port=producer_port, consumers=consumers,
                        consumer_port=consumer_port, partitions=partitions, db_url=db)
    options = _options(endpoints=",".join(topology.producer_endpoints()), records=records,
                       clients=clients, size=size, keys=keys, deadline_s=deadline)
    log_dir = tempfile.mkdtemp(prefix="zmqlab-demo-")
    supervisor = Supervisor(topology, log_dir=log_dir)
    failure: str | None = None
    report: LoadReport | None = None
    snap: dict[str, Any] | None = None
    with _sigterm_as_interrupt():
        try:
            if not as_json:
                err.print(f"starting broker, {producers} producers, {consumers} consumers "
                          f"(logs in {log_dir}) …", highlight=False)
            began = time.monotonic()
            supervisor.start()
            if not as_json:
                err.print(f"ready in {time.monotonic() - began:.1f} s; sending {records} "
                          f"records of {size} bytes with {clients} clients", highlight=False)
            tune_gc()
            with _progress_bar(records, not as_json) as progress:
                report = run_load(options, progress=progress)
            supervisor.check_alive()
            if not report.interrupted:
                if not as_json:
                    err.print(f"verifying {db} …", highlight=False)
                acked = report.acked_ids()
                report.verified = verify(db, acked.keys(), acked, verify_timeout,
                                         prefix=report.prefix)
                snap = query_status(topology.frontend, timeout_ms=2000)
            failure = _verdict(report)
        except KeyboardInterrupt:
            failure = "interrupted"
        except ZmqlabError as exc:
            failure = str(exc)
        finally:
            # A second Ctrl-C must not leave children running: ignore it while stopping.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                codes = supervisor.stop()
            finally:
                signal.signal(signal.SIGINT, previous)
    bad_exits = {k: v for k, v in codes.items() if v not in (0, -signal.SIGTERM)}
    if bad_exits and failure is None:
        failure = "node(s) exited badly: " + ", ".join(f"{k}={v}" for k, v in bad_exits.items())
    if report is not None:
        if as_json:
            data = report.to_json()
            data["status"] = snap
            data["failure"] = failure
            print(json.dumps(data, separators=(",", ":")), flush=True)
        else:
            out.print(report_table(report))
            if snap is not None and report.verified is not None:
                for table in summary_tables(snap, report.verified.by_consumer):
                    out.print(table)
    if failure is not None:
        if failure == "interrupted" or (report is not None and report.interrupted):
            err.print(f"children's logs are in {log_dir}", highlight=False)
        else:
            _print_logs(log_dir)
        err.print(f"[bold red]DEMO FAILED:[/bold red] {failure}", highlight=False)
        raise typer.Exit(1)
    shutil.rmtree(log_dir, ignore_errors=True)
    if not as_json:
        out.print(f"[bold green]OK[/bold green]: {report.acked if report else 0} records "
                  f"acknowledged and stored exactly once in {db}", highlight=False)


# -- watch -------------------------------------------------------------------------------------
def watch(
    broker: Annotated[str, typer.Option(help="The broker's frontend.")] = "tcp://127.0.0.1:5555",
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
    for_s: Annotated[float | None, typer.Option("--for", min=0.0, help="Stop after this many seconds (default: until Ctrl-C).")] = None,  # noqa: E501
) -> None:
    """A live dashboard of partitions, consumers and producers (Ctrl-C to leave)."""
    from zmqlab.dashboard import watch as run_watch

    stop = threading.Event()
    with _sigterm_as_interrupt():
        run_watch(broker, interval, for_s, console=out, stop=stop)


def register(app: typer.Typer) -> None:
    """Add ``load``, ``demo`` and ``watch`` to ``app``."""
    app.command(name="load")(load)
    app.command(name="demo")(demo)
    app.command(name="watch")(watch)
