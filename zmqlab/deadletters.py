"""Dead letters: list the records that failed ``max_attempts`` times and put them back.

Replaying sends a dead letter through the normal path again with its original id, key and
creation time. A dead letter is deleted only once the record exists elsewhere: the broker
queued it anew, or its id is already in ``records``. A broker that answers *duplicate* may
have queued nothing (it remembers the id from an earlier delivery), so a duplicate whose id is
not in ``records`` keeps its dead letter and is reported (``kept``): deleting it would leave
the record nowhere. A replay that fails half-way loses nothing either: at worst a record is
both stored and still listed here, and replaying it again clears it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from sqlalchemy import Engine, delete, select

from zmqlab.config import REPLY_TIMEOUT_MS
from zmqlab.errors import RecordsRefused
from zmqlab.producer import Ack, OutRecord, Producer, Refusal
from zmqlab.store import DEAD_LETTERS, RECORDS, make_engine

REPLAY_BATCH = 200


def list_dead(db_url: str, ids: Sequence[str] = (), limit: int = 100) -> list[dict[str, Any]]:
    engine = make_engine(db_url)
    try:
        query = select(DEAD_LETTERS).order_by(DEAD_LETTERS.c.failed_at).limit(limit)
        if ids:
            query = query.where(DEAD_LETTERS.c.id.in_(list(ids)))
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]
    finally:
        engine.dispose()


@dataclass
class ReplayReport:
    """What ``replay`` did with each dead letter it found, or was asked for."""

    # deleted: queued anew, or (``duplicate``) already in records
    replayed: list[Ack] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ids asked for that are not dead letters
    # answered duplicate but not in records: the dead letter stays, replay it later
    kept: list[Ack] = field(default_factory=list)


def replay(db_url: str, to: str, ids: Sequence[str] = (), *, limit: int = 10_000,
           timeout_ms: int = REPLY_TIMEOUT_MS, retries: int = 3,
           context: zmq.Context[Any] | None = None) -> ReplayReport:
    """Re-queue dead letters (all, or the given ids) through ``to``; delete those the broker
    queued anew, or whose id is already in ``records``; keep (and report) the others."""
    rows = list_dead(db_url, ids, limit)
    report = ReplayReport(missing=sorted(set(ids) - {r["id"] for r in rows}))
    engine = make_engine(db_url)
    try:
        with Producer(to, name="zmqlab-replay", timeout_ms=timeout_ms, retries=retries,
                      context=context) as client:
            for start in range(0, len(rows), REPLAY_BATCH):
                chunk = rows[start:start + REPLAY_BATCH]
                records = [OutRecord(r["payload"].encode(), r["id"], r["key"],
                                     r["created_at"].timestamp()) for r in chunk]
                try:
                    acks = client.send_batch(records)
                except RecordsRefused as exc:
                    acks = exc.acks
                    report.refused.extend(exc.refusals)
                if acks:
                    replayed, kept = _settle(engine, acks)
                    report.replayed.extend(replayed)
                    report.kept.extend(kept)
    finally:
        engine.dispose()
    return report


def _settle(engine: Engine, acks: list[Ack]) -> tuple[list[Ack], list[Ack]]:
    """Delete the dead letters of ``acks`` that exist elsewhere now; (deleted, kept)."""
    with engine.begin() as conn:
        duplicates = [a.id for a in acks if a.duplicate]
        stored = set(conn.execute(select(RECORDS.c.id).where(
            RECORDS.c.id.in_(duplicates))).scalars()) if duplicates else set()
        deleted = [a for a in acks if not a.duplicate or a.id in stored]
        if deleted:
            conn.execute(delete(DEAD_LETTERS).where(
                DEAD_LETTERS.c.id.in_([a.id for a in deleted])))
    return deleted, [a for a in acks if a.duplicate and a.id not in stored]
