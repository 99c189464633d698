"""The ids the broker knows: held in a partition, or acknowledged recently.

A producer that did not hear its ACK sends the same records again; the broker must answer
those with the position it already gave them instead of queueing them twice. So it keeps the
ids it holds, and those acknowledged lately with their position, as two generations of
``window`` to ``2 × window`` ids: when the newest fills up it becomes the older one and the
oldest is forgotten whole, a bounded memory with no per-id eviction work.

Sets and dicts, not one object per id, because every record of the hot path passes through
here: membership tests and updates are C loops over a whole column.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

POSITION_BITS = 48  # a remembered (partition, offset) is one int: partition << 48 | offset
_POSITION = 1 << POSITION_BITS


class DedupeWindow:
    """Held ids, and recently acknowledged ids with their position."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.held: set[str] = set()
        self._recent: dict[str, int] = {}
        self._older: dict[str, int] = {}

    def __contains__(self, record_id: object) -> bool:
        return record_id in self.held or record_id in self._recent or record_id in self._older

    @property
    def remembered(self) -> int:
        """Acknowledged ids remembered now (at most ``2 × window``)."""
        return len(self._recent) + len(self._older)

    def hold(self, ids: Iterable[str]) -> None:
        """These ids are in a partition now."""
        self.held.update(ids)

    def all_new(self, ids: Collection[Any]) -> bool:
        """True when none of ``ids`` is known (the common case, three C loops)."""
        return (self.held.isdisjoint(ids) and self._recent.keys().isdisjoint(ids)
                and self._older.keys().isdisjoint(ids))

    def unknown(self, ids: Sequence[Any]) -> set[Any] | None:
        """The distinct ids of ``ids`` that are not known, or None when an id cannot be
        looked up at all (not hashable: storing it refuses it).

        One set difference at a time: ``difference`` with several arguments walks each of
        the other sets whole."""
        try:
            fresh = set(ids)
        except TypeError:
            return None
        for known in (self.held, self._recent, self._older):
            fresh = fresh.difference(known)
        return fresh

    def acked_position(self, record_id: str) -> tuple[int, int] | None:
        """(partition, offset) of a recently acknowledged id, or None."""
        position = self._recent.get(record_id, self._older.get(record_id))
        if position is None:
            return None
        number, offset = divmod(position, _POSITION)
        return number, offset

    def settle(self, partition: int, first: int, ids: Sequence[str],
               dead: Collection[int] = ()) -> None:
        """Records ``ids`` at offsets ``first…`` of ``partition`` were acknowledged: they are
        no longer held, and each is remembered with its position, except the ``dead``
        offsets (a dead letter was not stored: replaying its id must not look like a retry).
        """
        self.held.difference_update(ids)
        if not self.window or not ids:
            return
        base = partition * _POSITION + first
        positions = zip(ids, range(base, base + len(ids)), strict=True)
        if dead:
            buried = {partition * _POSITION + offset for offset in dead}
            self._recent.update((i, p) for i, p in positions if p not in buried)
        else:
            self._recent.update(positions)
        if len(self._recent) >= self.window:
            self._older, self._recent = self._recent, {}
