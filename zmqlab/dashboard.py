"""``zmqlab watch`` (and ``status --watch``): a live view of the broker, refreshed every second.

Rates are not kept by the broker; they are derived here from two successive snapshots'
monotonic counters (``appended``/``acked`` per partition, ``acked`` per consumer, ``records``
per producer). A counter that went down means the broker restarted, so that rate is shown as
unknown for one refresh instead of as a negative number. A broker that does not answer is shown
as unreachable and asked again at the next refresh: the view survives a broker restart.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from zmqlab.errors import ZmqlabError
from zmqlab.render import partitions_of, producers_title
from zmqlab.topology import query_status


@dataclass
class Rates:
    """Per-second rates between the last two snapshots; None where unknown."""

    partition_in: dict[int, float | None] = field(default_factory=dict)
    partition_out: dict[int, float | None] = field(default_factory=dict)
    consumer_acked: dict[str, float | None] = field(default_factory=dict)
    producer_records: dict[str, float | None] = field(default_factory=dict)


def _rate(now: int, before: int | None, seconds: float) -> float | None:
    if before is None or now < before or seconds <= 0:
        return None
    return (now - before) / seconds


class RateTracker:
    """Remembers the previous snapshot and turns counters into rates."""

    def __init__(self) -> None:
        self._previous: dict[str, Any] | None = None
        self._at = 0.0

    def update(self, snap: dict[str, Any], now: float) -> Rates:
        previous, seconds = self._previous, now - self._at
        self._previous, self._at = snap, now
        if previous is not None and snap.get("uptime_s", 0) < previous.get("uptime_s", 0):
            previous = None  # the broker restarted: its counters began again at zero
        old = previous or {}
        parts = {p["partition"]: p for p in old.get("partitions", [])}
        cons = {c["name"]: c for c in old.get("consumers", [])}
        prods = {p["name"]: p for p in old.get("producers", [])}
        rates = Rates()
        for p in snap.get("partitions", []):
            before = parts.get(p["partition"], {})
            rates.partition_in[p["partition"]] = _rate(p["appended"], before.get("appended"),
                                                       seconds)
            rates.partition_out[p["partition"]] = _rate(p["acked"], before.get("acked"), seconds)
        for c in snap.get("consumers", []):
            rates.consumer_acked[c["name"]] = _rate(c["acked"], cons.get(c["name"], {})
                                                    .get("acked"), seconds)
        for pr in snap.get("producers", []):
            rates.producer_records[pr["name"]] = _rate(pr["records"], prods.get(pr["name"], {})
                                                       .get("records"), seconds)
        return rates


def _per_s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def _depth_bar(depth: int, capacity: int) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(capacity, 1), completed=depth, width=20),
                 Text(f"{depth}/{capacity}", justify="right"))
    return grid


def render(snap: dict[str, Any] | None, rates: Rates, broker: str,
           error: str | None = None, unreachable_s: float | None = None) -> RenderableType:
    """The dashboard for one snapshot (or the last one, dimmed, under an "unreachable" banner)."""
    parts: list[RenderableType] = []
    if error is not None:
        since = f" for {unreachable_s:.0f} s" if unreachable_s is not None else ""
        parts.append(Panel(Text(f"broker unreachable at {broker}{since}: {error}\n"
                                "retrying every refresh …", style="bold red"),
                           border_style="red"))
    if snap is None:
        return Group(*parts) if parts else Text(f"waiting for broker at {broker} …")
    style = "dim" if error is not None else ""
    ready = "ready" if snap.get("ready") else f"NOT READY: {snap.get('waiting')}"
    partitions = Table(title=f"broker {broker} — up {snap['uptime_s']:.0f} s — {ready}",
                       style=style, title_justify="left")
    for column in ("partition", "depth / capacity", "in flight", "owner", "epoch", "in", "out"):
        partitions.add_column(column, justify="left" if column == "owner" else "right")
    for p in snap["partitions"]:
        owner = p["owner"] or "-"
        if p.get("target") != p["owner"]:
            owner += f" -> {p.get('target') or '-'}"
        number = p["partition"]
        partitions.add_row(f"Q{number + 1}", _depth_bar(p["depth"], p["capacity"]),
                           str(p["inflight"]), owner, str(p["epoch"]),
                           _per_s(rates.partition_in.get(number)),
                           _per_s(rates.partition_out.get(number)))
    consumers = Table(title="consumers", style=style, title_justify="left")
    for column in ("consumer", "partitions", "in flight", "credit", "acked", "last heartbeat"):
        consumers.add_column(column)
    for c in snap["consumers"]:
        consumers.add_row(c["name"], partitions_of(c), str(c["inflight"]),
                          str(c.get("credit", "-")),
                          _per_s(rates.consumer_acked.get(c["name"])),
                          f"{c['last_seen_s']:.1f} s ago")
    producers = Table(title=producers_title(snap), style=style, title_justify="left")
    for column in ("producer", "records", "total", "last seen"):
        producers.add_column(column)
    for pr in snap["producers"]:
        producers.add_row(pr["name"], _per_s(rates.producer_records.get(pr["name"])),
                          str(pr["records"]), f"{pr['last_seen_s']:.1f} s ago")
    parts += [partitions, consumers, producers]
    return Group(*parts)


def watch(broker: str, interval_s: float = 1.0, duration_s: float | None = None, *,
          console: Console | None = None, timeout_ms: int | None = None,
          stop: threading.Event | None = None) -> int:
    """Show the live dashboard until ``duration_s`` passes, ``stop`` is set or Ctrl-C.

    Returns how many refreshes reached the broker (tests use it to see that it recovered).
    Each refresh is one STATS request with a timeout shorter than the interval, so an
    unreachable broker slows nothing down.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    stop = stop or threading.Event()
    timeout_ms = timeout_ms or max(50, min(1000, int(interval_s * 800)))
    deadline = None if duration_s is None else time.monotonic() + duration_s
    tracker = RateTracker()
    rates = Rates()
    snap: dict[str, Any] | None = None
    down_since: float | None = None
    reached = 0
    console = console or Console()
    with Live(render(None, rates, broker), console=console, refresh_per_second=4,
              auto_refresh=False) as live:
        try:
            while not stop.is_set():
                began = time.monotonic()
                error = None
                try:
                    snap = query_status(broker, timeout_ms=timeout_ms)
                    rates = tracker.update(snap, began)
                    reached += 1
                    down_since = None
                except ZmqlabError as exc:
                    error = str(exc)
                    down_since = down_since if down_since is not None else began
                unreachable_s = None if down_since is None else time.monotonic() - down_since
                live.update(render(snap, rates, broker, error, unreachable_s), refresh=True)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = interval_s - (now - began)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if wait > 0:
                    stop.wait(wait)  # the refresh period, not synchronisation
        except KeyboardInterrupt:
            pass
    return reached
