"""``send``, ``status``, ``assign`` and ``watch``: talk to a running fabric, print the answer.

``watch_broker`` is the ``watch`` command (``watch`` is also ``status``'s flag).
"""

from __future__ import annotations

from typing import Annotated

import typer

from zmqlab.cli._common import fail, out
from zmqlab.config import REPLY_TIMEOUT_MS
from zmqlab.errors import RecordsRefused, ZmqlabError

SUPERVISOR_TIMEOUT_MS = 300  # a status endpoint on this machine answers at once, or is absent


def send(
    payload: Annotated[str, typer.Argument(help="The record: a JSON object.")],
    to: Annotated[str, typer.Option(help="A producer service (or the broker's frontend).")] = "tcp://127.0.0.1:8080",
    key: Annotated[str | None, typer.Option(help="Partition key (same key, same partition).")] = None,
    id: Annotated[str | None, typer.Option("--id", help="Record id (default: a new UUID).")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10)] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0)] = 2,
) -> None:
    """Send one record and print its acknowledgement."""
    from zmqlab.producer import Producer
    from zmqlab.protocol import parse_json

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


def status(
    broker: Annotated[str, typer.Option(help="The broker's frontend.")] = "tcp://127.0.0.1:5555",
    supervisor: Annotated[str, typer.Option(help="`zmqlab up`'s status endpoint: its nodes table is shown when it answers (silently left out when not).")] = "tcp://127.0.0.1:5557",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw snapshot as JSON (the supervisor's under \"supervisor\", null when it did not answer).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="A live dashboard, refreshed every second.")] = False,
    for_s: Annotated[float | None, typer.Option("--for", min=0.0, help="With --watch: stop after this many seconds.")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10)] = 1500,
) -> None:
    """Show partitions (depth, in flight, owner, epoch, disk), consumers, producers, and the
    nodes `zmqlab up` supervises (pid, state, restarts)."""
    if watch:
        if as_json:
            raise typer.BadParameter("--watch shows a dashboard; use --json without it",
                                     param_hint="--json")
        watch_broker(broker=broker, interval=1.0, for_s=for_s)
        return
    from concurrent.futures import ThreadPoolExecutor

    from zmqlab.render import render_nodes, render_status
    from zmqlab.topology import query_status, query_supervisor

    # Both at once: the supervisor's short timeout then costs nothing when it is not there.
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(query_supervisor, supervisor, min(timeout_ms, SUPERVISOR_TIMEOUT_MS))
        try:
            snap = query_status(broker, timeout_ms=timeout_ms)
        except ZmqlabError as exc:
            nodes = asked.result()
            if nodes is not None and not as_json:
                out.print(render_nodes(nodes))  # it may show why: the broker waits for a restart
            fail(f"broker unreachable at {broker}: {exc}")
        snap["supervisor"] = asked.result()
    if as_json:
        out.print_json(data=snap)
        return
    out.print(render_status(snap))


def assign(
    partitions: Annotated[int, typer.Option(min=1, help="Number of partitions.")] = 6,
    consumers: Annotated[int, typer.Option(min=1, help="Number of consumers.")] = 3,
    consumer_port: Annotated[int, typer.Option(min=1, max=65535, help="First consumer port.")] = 9090,
) -> None:
    """Print the round-robin assignment table (Q4 -> consumer-1 …)."""
    from zmqlab.assignment import format_table

    for line in format_table(partitions, [str(consumer_port + i) for i in range(consumers)]):
        out.print(line, highlight=False)


def watch_broker(
    broker: Annotated[str, typer.Option(help="The broker's frontend.")] = "tcp://127.0.0.1:5555",
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
    for_s: Annotated[float | None, typer.Option("--for", min=0.0, help="Stop after this many seconds (default: until Ctrl-C).")] = None,
) -> None:
    """A live dashboard of partitions, consumers and producers (Ctrl-C to leave)."""
    from zmqlab.dashboard import watch
    from zmqlab.runner import sigterm_as_interrupt

    with sigterm_as_interrupt():
        watch(broker, interval, for_s, console=out)
