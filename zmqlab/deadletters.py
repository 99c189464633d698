"""Dead letters: list the records that failed ``max_attempts`` times and put them back.

Replaying sends a dead letter through the normal path again with its original id, key and
creation time; only once the broker has acknowledged it is the dead letter deleted, so a replay
that fails half-way loses nothing (at worst a record is both stored and still listed here, and
replaying it again is answered as a duplicate and clears it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from sqlalchemy import delete, select

from zmqlab.config import REPLY_TIMEOUT_MS
from zmqlab.errors import RecordsRefused
from zmqlab.producer import Ack, OutRecord, Producer, Refusal
from zmqlab.store import DEAD_LETTERS, make_engine

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
    replayed: list[Ack] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ids asked for that are not dead letters


def replay(db_url: str, to: str, ids: Sequence[str] = (), *, limit: int = 10_000,
           timeout_ms: int = REPLY_TIMEOUT_MS, retries: int = 3,
           context: zmq.Context[Any] | None = None) -> ReplayReport:
    """Re-queue dead letters (all, or the given ids) through ``to``; delete what was acked."""
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
                    with engine.begin() as conn:
                        conn.execute(delete(DEAD_LETTERS).where(
                            DEAD_LETTERS.c.id.in_([a.id for a in acks])))
                report.replayed.extend(acks)
    finally:
        engine.dispose()
    return report
