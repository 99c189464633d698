"""Rich renderings of what the library returns: status, dead letters, load reports, progress.

Pure functions of their input (a broker snapshot, rows, a ``LoadReport``) so that the CLI only
prints them and the tables can be checked without a terminal. The live dashboard, which keeps
state between refreshes, lives in ``zmqlab.dashboard``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from rich.table import Table

if TYPE_CHECKING:  # loadgen loads SQLAlchemy; these are only types here
    from zmqlab.loadgen import LoadReport, Progress


def producers_title(snap: dict[str, Any]) -> str:
    """The producers table's title; says when PUTs are parked, waiting for room in the queue."""
    waiting = snap.get("waiting_puts", 0)
    return "producers" + (f" — {waiting} PUT(s) waiting for room" if waiting else "")


def partitions_of(consumer: dict[str, Any]) -> str:
    return " ".join(f"Q{p + 1}" for p in consumer["partitions"]) or "-"


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``12.0 MiB``, ``3.2 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def broker_title(snap: dict[str, Any]) -> str:
    """The partition table's title: uptime, readiness, and where the log is when there is one."""
    title = f"zmqlab broker — up {snap['uptime_s']:.0f} s"
    if not snap["ready"]:
        title += f" — NOT READY: {snap['waiting']}"
    wal = snap.get("log")
    if wal:
        title += f"\nlog {wal['dir']} — fsync {wal['fsync']}, {wal['segments']} segment(s)"
        if wal.get("recovered"):
            title += f", {wal['recovered']} record(s) recovered at start"
    return title


def render_status(snap: dict[str, Any]) -> Table:
    """``zmqlab status``: partitions (with disk use when the broker keeps a log), consumers,
    producers, and the nodes ``zmqlab up`` supervises when ``snap["supervisor"]`` has them;
    one table each."""
    partitions = snap["partitions"]
    on_disk = bool(partitions) and "disk_bytes" in partitions[0]
    table = Table(title=broker_title(snap))
    columns = ["partition", "depth", "capacity", "in flight", "owner", "epoch", "acked"]
    for column in columns:
        table.add_column(column, justify="right")
    if on_disk:
        table.add_column("disk", justify="right", no_wrap=True)
        table.add_column("segs", justify="right")
    for p in partitions:
        owner = p["owner"] or "-"
        if p["target"] != p["owner"]:
            owner += f" -> {p['target'] or '-'}"
        disk = [human_bytes(p["disk_bytes"]), str(p["segments"])] if on_disk else []
        table.add_row(f"Q{p['partition'] + 1}", str(p["depth"]), str(p["capacity"]),
                      str(p["inflight"]), owner, str(p["epoch"]), str(p["acked"]), *disk)
    grid = Table.grid(padding=(1, 0))
    grid.add_row(table)
    consumers = Table(title="consumers")
    for column in ("consumer", "partitions", "in flight", "acked", "last seen"):
        consumers.add_column(column)
    for c in snap["consumers"]:
        consumers.add_row(c["name"], partitions_of(c), str(c["inflight"]), str(c["acked"]),
                          f"{c['last_seen_s']:.1f} s ago")
    grid.add_row(consumers)
    producers = Table(title=producers_title(snap))
    for column in ("producer", "records", "last seen"):
        producers.add_column(column)
    for pr in snap["producers"]:
        producers.add_row(pr["name"], str(pr["records"]), f"{pr['last_seen_s']:.1f} s ago")
    grid.add_row(producers)
    if snap.get("supervisor"):
        grid.add_row(render_nodes(snap["supervisor"]))
    return grid


def render_nodes(supervisor: dict[str, Any]) -> Table:
    """The nodes ``zmqlab up`` supervises: role, name, pid, state, restarts, last exit."""
    table = Table(title=f"nodes — supervised by zmqlab up (pid {supervisor['pid']})")
    for column in ("role", "name", "pid", "state", "up", "restarts", "last exit"):
        table.add_column(column, justify="right" if column in ("pid", "up", "restarts")
                         else "left")
    for n in supervisor["nodes"]:
        state = n["state"]
        if n.get("restart_in_s") is not None:
            state += f" (restart in {n['restart_in_s']:.1f} s)"
        uptime = "-" if n.get("uptime_s") is None else f"{n['uptime_s']:.0f} s"
        table.add_row(n["role"], n["name"], str(n["pid"]), state, uptime, str(n["restarts"]),
                      n.get("last_exit_text") or "-",
                      style="red" if n["state"] in ("backoff", "fatal") else None)
    return table


def dead_letters_table(rows: list[dict[str, Any]], db_url: str) -> Table:
    """``zmqlab dead list``: one row per dead letter, payloads cut at 200 characters."""
    table = Table(title=f"{len(rows)} dead letter(s) in {db_url}")
    for column in ("id", "partition", "offset", "key", "attempts", "failed at", "last error",
                   "payload"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["id"], f"Q{r['partition'] + 1}", str(r["offset"]), r["key"] or "-",
                      str(r["attempts"]), str(r["failed_at"])[:19], r["last_error"],
                      r["payload"][:200])
    return table


class LoadProgress:
    """A progress bar with acked/s, errors and retries: a context manager that shows it, and
    the ``progress`` callback of ``loadgen.run_load`` while it does."""

    def __init__(self, total: int, console: Console) -> None:
        self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[rate]:>9} acked/s"),
                        TextColumn("[red]{task.fields[errors]} errors[/red]"),
                        TextColumn("{task.fields[retried]} retries"),
                        TimeElapsedColumn(), console=console, transient=False)
        self._task = self._bar.add_task("load", total=total, rate="-", errors=0, retried=0)
        self._window: list[tuple[float, int]] = []

    def __enter__(self) -> LoadProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def __call__(self, p: Progress) -> None:
        window = self._window
        window.append((p.elapsed_s, p.acked))
        while len(window) > 2 and p.elapsed_s - window[0][0] > 1.0:
            window.pop(0)  # acked/s over about the last second
        (t0, a0), (t1, a1) = window[0], window[-1]
        rate = f"{(a1 - a0) / (t1 - t0):,.0f}" if t1 > t0 else "-"
        self._bar.update(self._task, completed=p.acked + p.refused, rate=rate, errors=p.refused,
                         retried=p.retried)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def report_table(report: LoadReport) -> Table:
    """The final report of a load as a two-column table."""
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


def verdict(report: LoadReport) -> str | None:
    """Why a load failed, in one line (losses, duplicates, refusals, interruption), or None."""
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


def summary_tables(snap: dict[str, Any], stored_by_consumer: dict[str, int]) -> list[Table]:
    """The demo's per-partition and per-consumer summary of the broker's snapshot and the
    database."""
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
        consumers.add_row(c["name"], partitions_of(c), str(c["delivered"]), str(c["acked"]),
                          str(stored_by_consumer.get(c["name"], 0)))
    return [partitions, consumers]
