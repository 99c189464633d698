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
from array import array
from typing import Any, Final

from zmqlab.errors import ProtocolError
from zmqlab.protocol import ErrorCode

MAX_ATTEMPT = 65_535  # attempts are kept in an unsigned 16-bit array


# A held record as handed out (built on delivery, not what the ring stores):
# (offset, id, key, producer, created_at, attempt, payload). A plain tuple: a NamedTuple's
# constructor cost a tenth of the broker's time on the delivery path.
Entry = tuple[int, str, str | None, str, float, int, bytes]
ID: Final = 1
ATTEMPT: Final = 5
PAYLOAD: Final = 6


class Partition:
    """One ring buffer plus its ownership lease.

    The ring keeps each field in its own preallocated list or array instead of an object per
    record: a held 200-byte record then costs its payload, its id and a few slots (~2x the
    payload bytes) instead of ~3x with an object, a float and a tuple per record.
    """

    def __init__(self, number: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.number = number
        self.capacity = capacity
        self.lock = threading.Lock()
        self._ids: list[str | None] = [None] * capacity
        self._keys: list[str | None] = [None] * capacity
        self._producers: list[str | None] = [None] * capacity
        self._payloads: list[bytes | None] = [None] * capacity
        self._created = array("d", bytes(8 * capacity))
        self._attempts = array("H", bytes(2 * capacity))
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
    def append(self, record_id: str, key: str | None, producer: str, created_at: float,
               payload: bytes) -> int | None:
        """Store a record and return its offset, or None when the ring is full."""
        with self.lock:
            if self.tail - self.head >= self.capacity:
                return None
            offset = self.tail
            slot = offset % self.capacity
            self._ids[slot] = record_id
            self._keys[slot] = key
            self._producers[slot] = producer
            self._payloads[slot] = payload
            self._created[slot] = created_at
            self._attempts[slot] = 1
            self.tail = offset + 1
            self.appended_total += 1
            return offset

    def take(self, limit: int) -> list[Entry]:
        """Hand out up to ``limit`` pending records (they become in flight, and stay here)."""
        with self.lock:
            end = min(self.tail, self.cursor + limit)
            out = self._entries(self.cursor, end)
            self.cursor = end
            return out

    def _entries(self, start: int, end: int) -> list[Entry]:
        acked, cap = self._acked, self.capacity
        ids, keys, producers = self._ids, self._keys, self._producers
        created, attempts, payloads = self._created, self._attempts, self._payloads
        return [(o, ids[s], keys[s], producers[s], created[s], attempts[s], payloads[s])  # type: ignore[misc]
                for o, s in ((o, o % cap) for o in range(start, end)) if o not in acked]

    def find(self, record_id: str) -> int | None:
        """The offset of a held record by id (a scan: only retried duplicates need it)."""
        with self.lock:
            try:
                slot = self._ids.index(record_id)
            except ValueError:
                return None
            return self.head + (slot - self.head) % self.capacity

    def ack(self, owner: str, epoch: int, offsets: list[int]) -> list[tuple[int, str]]:
        """Remove acknowledged records; refuse (changing nothing) stale, foreign or unknown ones.

        Returns the (offset, id) of the records that left the ring. If the partition was
        draining towards a new owner and nothing is in flight any more, the lease moves now.
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
            head, count = self.head, len(offsets)
            contiguous = (not self._acked and head + count <= self.cursor
                          and offsets == list(range(head, head + count)))
            if not contiguous:  # the general case: validate each, allow out-of-order
                for offset in offsets:
                    if type(offset) is not int:
                        raise ProtocolError(ErrorCode.BAD_MESSAGE, "offsets must be integers")
                    if not self.head <= offset < self.cursor or offset in self._acked:
                        raise ProtocolError(
                            ErrorCode.UNKNOWN_OFFSET,
                            f"offset {offset} is not in flight in partition {self.number} "
                            f"(in flight: [{self.head}, {self.cursor}))",
                        )
                if len(set(offsets)) != count:
                    raise ProtocolError(ErrorCode.UNKNOWN_OFFSET, "an offset is listed twice")
                self._acked.update(offsets)
                count = 0
                while head + count in self._acked:
                    self._acked.discard(head + count)
                    count += 1
            removed = []
            ids, keys, producers, payloads, cap = (self._ids, self._keys, self._producers,
                                                   self._payloads, self.capacity)
            for offset in range(head, head + count):
                slot = offset % cap
                record_id = ids[slot]
                assert record_id is not None
                removed.append((offset, record_id))
                ids[slot] = keys[slot] = producers[slot] = payloads[slot] = None
            self.head = head + count
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
        attempts = self._attempts
        for offset in range(self.head, self.cursor):
            if offset not in self._acked:
                slot = offset % self.capacity
                attempts[slot] = min(attempts[slot] + 1, MAX_ATTEMPT)
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
