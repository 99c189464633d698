"""``dead list`` and ``dead replay``: the records that failed ``--max-attempts`` times."""

from __future__ import annotations

from typing import Annotated

import typer

from zmqlab.cli._common import DbUrl, err, failing, out
from zmqlab.config import DEFAULT_DB_URL, REPLY_TIMEOUT_MS

app = typer.Typer(no_args_is_help=True,
                  help="Dead letters: records that failed --max-attempts times.")


@app.command("list")
def dead_list(
    db: DbUrl = DEFAULT_DB_URL,
    id: Annotated[list[str] | None, typer.Option("--id", help="Only these ids (repeatable).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Show dead letters: id, partition, attempts, last error, payload."""
    from zmqlab.deadletters import list_dead

    with failing():
        rows = list_dead(db, id or (), limit)
    if as_json:
        out.print_json(data=rows, default=str)
        return
    from zmqlab.render import dead_letters_table

    out.print(dead_letters_table(rows, db))


@app.command("replay")
def dead_replay(
    db: DbUrl = DEFAULT_DB_URL,
    to: Annotated[str, typer.Option(help="A producer service (or the broker's frontend).")] = "tcp://127.0.0.1:8080",
    id: Annotated[list[str] | None, typer.Option("--id", help="Only these ids (repeatable).")] = None,
    timeout_ms: Annotated[int, typer.Option(min=10)] = REPLY_TIMEOUT_MS,
    retries: Annotated[int, typer.Option(min=0)] = 3,
) -> None:
    """Put dead letters back in the queue (all, or --id ones); each is deleted once the broker
    queued it anew, or when its id is already stored."""
    from zmqlab.deadletters import replay

    with failing():
        report = replay(db, to, id or (), timeout_ms=timeout_ms, retries=retries)
    for ack in report.replayed:
        out.print(f"replayed id={ack.id} partition={ack.partition} (Q{ack.partition + 1}) "
                  f"offset={ack.offset}", highlight=False)
    for ack in report.kept:
        err.print(f"kept id={ack.id}: the broker still holds it (partition {ack.partition}, "
                  f"offset {ack.offset}) and it is not stored yet; replay it again later",
                  highlight=False)
    for refusal in report.refused:
        err.print(f"refused id={refusal.id}: {refusal.code} {refusal.reason}", highlight=False)
    for missing in report.missing:
        err.print(f"not a dead letter: {missing}", highlight=False)
    out.print(f"{len(report.replayed)} replayed, {len(report.kept)} kept, "
              f"{len(report.refused)} refused, {len(report.missing)} not found", highlight=False)
    if report.refused or report.missing or report.kept:
        raise typer.Exit(1)
