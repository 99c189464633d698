"""A partition: a bounded ring buffer with three cursors and a lease-based owner.

::

    offset:  head ──────── cursor ──────── tail
             [ in flight  )[  pending     )[ free … up to capacity

Offsets are absolute and only grow; the slot is ``offset % capacity``. A record leaves the ring
only when its owner acknowledges it (``ack``); a full ring refuses appends instead of
overwriting. Ownership is a lease ``(owner, epoch)``: every change of owner bumps the epoch, and
an ACK that names an old epoch is refused, so a late ACK can never settle a record that was
redelivered elsewhere. A change of owner waits until the old owner's in-flight records are
acknowledged (``want_owner`` drains) or released (``owner_gone``), so a partition is never in
flight at two consumers.

No sockets here: the broker thread is the only writer; ``lock`` keeps readers on other threads
(status, tests) consistent and is held only for a few lines.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from zmqlab.errors import ProtocolError
from zmqlab.protocol import ErrorCode


@dataclass(slots=True)
class Entry:
    """A record held by the broker: metadata plus the payload bytes, never decoded here."""

    id: str
    key: str | None
    producer: str
    created_at: float
    payload: bytes
    attempt: int = 1


class Partition:
    """One ring buffer plus its ownership lease."""

    def __init__(self, number: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.number = number
        self.capacity = capacity
        self.lock = threading.Lock()
        self._slots: list[Entry | None] = [None] * capacity
        self.head = 0
        self.cursor = 0
        self.tail = 0
        self._acked: set[int] = set()  # acknowledged offsets above head (out-of-order ACKs)
        self.owner: str | None = None
        self.epoch = 0
        self.target: str | None = None  # the owner-to-be while the current owner drains
        self.appended_total = 0
        self.acked_total = 0
        self.released_total = 0

    # -- sizes -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.tail - self.head

    @property
    def inflight(self) -> int:
        return self.cursor - self.head

    @property
    def pending(self) -> int:
        return self.tail - self.cursor

    @property
    def draining(self) -> bool:
        return self.target != self.owner

    # -- records ---------------------------------------------------------------------------
    def append(self, entry: Entry) -> int | None:
        """Store ``entry`` and return its offset, or None when the ring is full."""
        with self.lock:
            if self.tail - self.head >= self.capacity:
                return None
            offset = self.tail
            self._slots[offset % self.capacity] = entry
            self.tail = offset + 1
            self.appended_total += 1
            return offset

    def take(self, limit: int) -> list[tuple[int, Entry]]:
        """Hand out up to ``limit`` pending records (they become in flight, and stay here)."""
        with self.lock:
            out: list[tuple[int, Entry]] = []
            end = min(self.tail, self.cursor + limit)
            slots, cap = self._slots, self.capacity
            for offset in range(self.cursor, end):
                if offset not in self._acked:
                    entry = slots[offset % cap]
                    assert entry is not None
                    out.append((offset, entry))
            self.cursor = end
            return out

    def entry(self, offset: int) -> Entry | None:
        with self.lock:
            if self.head <= offset < self.tail:
                return self._slots[offset % self.capacity]
            return None

    def ack(self, owner: str, epoch: int, offsets: list[int]) -> list[tuple[int, Entry]]:
        """Remove acknowledged records; refuse (changing nothing) stale, foreign or unknown ones.

        Returns the (offset, entry) pairs that left the ring. If the partition was draining
        towards a new owner and nothing is in flight any more, the lease moves now.
        """
        with self.lock:
            if owner != self.owner:
                raise ProtocolError(
                    ErrorCode.NOT_OWNER,
                    f"partition {self.number} is owned by {self.owner!r}, not {owner!r}",
                )
            if epoch != self.epoch:
                raise ProtocolError(
                    ErrorCode.STALE_EPOCH,
                    f"partition {self.number} is at epoch {self.epoch}, ACK named {epoch}",
                )
            for offset in offsets:
                if not self.head <= offset < self.cursor or offset in self._acked:
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_OFFSET,
                        f"offset {offset} is not in flight in partition {self.number} "
                        f"(in flight: [{self.head}, {self.cursor}))",
                    )
            self._acked.update(offsets)
            removed: list[tuple[int, Entry]] = []
            slots, cap, acked = self._slots, self.capacity, self._acked
            while self.head in acked:
                acked.discard(self.head)
                slot = self.head % cap
                entry = slots[slot]
                assert entry is not None
                removed.append((self.head, entry))
                slots[slot] = None
                self.head += 1
            self.acked_total += len(offsets)
            if self.draining and self.cursor == self.head:
                self._transfer()
            return removed

    # -- ownership -------------------------------------------------------------------------
    def want_owner(self, target: str | None) -> bool:
        """Rebalance towards ``target``; returns True when the lease moved now.

        The move waits while the current owner has records in flight: it keeps them and its
        ACKs for this epoch still count, but it receives nothing new from this partition.
        """
        with self.lock:
            self.target = target
            if self.owner == target:
                return False
            if self.cursor == self.head or self.owner is None:
                self._transfer()
                return True
            return False

    def owner_gone(self) -> int:
        """The owner died or left: release its in-flight records and move the lease.

        Released records go back to the head of the partition with their attempt raised, so
        the next owner receives them first, in order. Returns how many were released.
        """
        with self.lock:
            released = self._release()
            self._transfer()
            return released

    def _release(self) -> int:
        count = 0
        for offset in range(self.head, self.cursor):
            if offset not in self._acked:
                entry = self._slots[offset % self.capacity]
                assert entry is not None
                entry.attempt += 1
                count += 1
        self.cursor = self.head
        # Out-of-order ACKs above head stay acknowledged: those records are stored already.
        self.released_total += count
        return count

    def _transfer(self) -> None:
        if self.cursor != self.head:
            self._release()
        if self.owner != self.target:
            self.owner = self.target
            self.epoch += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "partition": self.number,
                "depth": self.tail - self.head,
                "capacity": self.capacity,
                "inflight": self.cursor - self.head,
                "pending": self.tail - self.cursor,
                "head": self.head,
                "tail": self.tail,
                "owner": self.owner,
                "epoch": self.epoch,
                "target": self.target,
                "appended": self.appended_total,
                "acked": self.acked_total,
                "released": self.released_total,
            }
