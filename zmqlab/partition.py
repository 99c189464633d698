"""A partition: a bounded ring buffer with three cursors and a lease-based owner.

::

    offset:  head ──────── cursor ──────── tail
             [ in flight  )[  pending     )[ free … up to capacity

Offsets are absolute and only grow; the slot is ``offset % capacity``. A record leaves the ring
only when its owner acknowledges it (``ack``); a full ring refuses appends instead of
overwriting. Ownership is a lease ``(owner, epoch)``: every change of owner bumps the epoch, and
an ACK that names an old epoch is refused, so a late ACK can never settle a record that was
redelivered elsewhere. A change of owner waits until the old owner's in-flight records are
acknowledged (``want_owner`` hands over) or released (``owner_gone``), so a partition is never in
flight at two consumers.

No sockets here: the broker thread is the only writer; ``lock`` keeps readers on other threads
(status, tests) consistent and is held only for a few lines.
"""

from __future__ import annotations

import threading
from array import array
from typing import Any, NamedTuple

from zmqlab.errors import ErrorCode, LeaseError, ProtocolError

MAX_ATTEMPT = 65_535  # attempts are kept in an unsigned 16-bit array
_FIRST_ATTEMPT = array("H", [1])


class Taken(NamedTuple):
    """Records handed out by ``take``, column by column (how RECORDS carries them).

    ``offsets`` are runs ``[first, count]``: one run unless out-of-order ACKs left holes.
    Columns rather than a tuple per record: the broker slices its ring straight into them and
    JSON-encodes lists of plain values, with no per-record Python on the delivery path.
    """

    offsets: list[list[int]]
    ids: list[str]
    keys: list[str | None]
    producers: list[str]
    created_us: list[int]
    attempts: list[int]
    payloads: list[bytes]


class Partition:
    """One ring buffer plus its ownership lease.

    The ring keeps each field in its own preallocated list or array instead of an object per
    record: a held record then costs its payload, its id and a few slots, with no object, float
    or tuple of its own. Records come and go in runs (a PUT batch, a RECORDS batch, an ACK),
    so each column is read and written by slice assignment: C loops instead of Python ones.
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
        self._created = array("q", bytes(8 * capacity))  # microseconds since the epoch
        self._attempts = array("H", bytes(2 * capacity))
        self.head = 0
        self.cursor = 0
        self.tail = 0
        self._acked: set[int] = set()  # acknowledged offsets above head (out-of-order ACKs)
        self.owner: str | None = None
        self.epoch = 0
        self.target: str | None = None  # the next owner, once the current one settles
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
    def handing_over(self) -> bool:
        """The lease is moving to ``target`` once the owner's in-flight records are settled."""
        return self.target != self.owner

    @property
    def room(self) -> int:
        return self.capacity - (self.tail - self.head)

    # -- records ---------------------------------------------------------------------------
    def append(self, record_id: str, key: str | None, producer: str, created_us: int,
               payload: bytes) -> int | None:
        """Store one record and return its offset, or None when the ring is full."""
        first, count = self.extend([record_id], [key], producer, [created_us], [payload])
        return first if count else None

    def extend(self, ids: list[str], keys: list[str | None], producer: str,
               created_us: list[int], payloads: list[bytes]) -> tuple[int, int]:
        """Store as many of these records as there is room for, in order.

        Returns (offset of the first, how many were stored); the rest did not fit.
        """
        with self.lock:
            count = min(len(ids), self.capacity - (self.tail - self.head))
            first = self.tail
            if count <= 0:
                return first, 0
            for start, stop, lo, hi in self._spans(first, count):
                self._ids[start:stop] = ids[lo:hi]
                self._keys[start:stop] = keys[lo:hi]
                self._producers[start:stop] = [producer] * (hi - lo)
                self._payloads[start:stop] = payloads[lo:hi]
                self._created[start:stop] = array("q", created_us[lo:hi])
                self._attempts[start:stop] = _FIRST_ATTEMPT * (hi - lo)
            self.tail = first + count
            self.appended_total += count
            return first, count

    def _spans(self, first: int, count: int) -> list[tuple[int, int, int, int]]:
        """The ring slots [start, stop) of offsets first..first+count, as at most two spans,
        each with the matching [lo, hi) of a run of that length."""
        slot = first % self.capacity
        head_part = min(count, self.capacity - slot)
        spans = [(slot, slot + head_part, 0, head_part)]
        if head_part < count:
            spans.append((0, count - head_part, head_part, count))
        return spans

    def take(self, limit: int) -> Taken:
        """Hand out up to ``limit`` pending records (they become in flight, and stay here)."""
        with self.lock:
            end = min(self.tail, self.cursor + limit)
            out = self._columns(self.cursor, end)
            self.cursor = end
            return out

    def _columns(self, start: int, end: int) -> Taken:
        taken = Taken([], [], [], [], [], [], [])
        if end <= start:
            return taken
        if self._acked and any(o in self._acked for o in range(start, end)):
            # Holes (acknowledged out of order before a release): runs around them.
            run_start = None
            for offset in range(start, end + 1):
                if offset < end and offset not in self._acked:
                    run_start = offset if run_start is None else run_start
                elif run_start is not None:
                    self._columns_into(taken, run_start, offset)
                    run_start = None
            return taken
        self._columns_into(taken, start, end)
        return taken

    def _columns_into(self, taken: Taken, start: int, end: int) -> None:
        taken.offsets.append([start, end - start])
        for lo, hi, _, _ in self._spans(start, end - start):
            taken.ids.extend(self._ids[lo:hi])  # type: ignore[arg-type]
            taken.keys.extend(self._keys[lo:hi])
            taken.producers.extend(self._producers[lo:hi])  # type: ignore[arg-type]
            taken.created_us.extend(self._created[lo:hi])
            taken.attempts.extend(self._attempts[lo:hi])
            taken.payloads.extend(self._payloads[lo:hi])  # type: ignore[arg-type]

    def find(self, record_id: str) -> int | None:
        """The offset of a held record by id (a scan: only retried duplicates need it)."""
        with self.lock:
            try:
                slot = self._ids.index(record_id)
            except ValueError:
                return None
            return self.head + (slot - self.head) % self.capacity

    def ack(self, owner: str, epoch: int, offsets: list[int]) -> tuple[int, list[str]]:
        """Remove acknowledged records; refuse (changing nothing) stale, foreign or unknown ones.

        Returns (offset of the first, ids) of the records that left the ring: always a run
        from the old head, since out-of-order ACKs wait above the head until it is acknowledged.
        If the partition was being handed over to a new owner and nothing is in flight any more,
        the lease moves now.
        """
        with self.lock:
            if owner != self.owner:
                raise LeaseError(
                    ErrorCode.NOT_OWNER,
                    f"partition {self.number} is owned by {self.owner!r}, not {owner!r}",
                )
            if epoch != self.epoch:
                raise LeaseError(
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
                        raise LeaseError(
                            ErrorCode.UNKNOWN_OFFSET,
                            f"offset {offset} is not in flight in partition {self.number} "
                            f"(in flight: [{self.head}, {self.cursor}))",
                        )
                if len(set(offsets)) != count:
                    raise LeaseError(ErrorCode.UNKNOWN_OFFSET, "an offset is listed twice")
                self._acked.update(offsets)
                count = 0
                while head + count in self._acked:
                    self._acked.discard(head + count)
                    count += 1
            removed: list[str] = []
            for start, stop, _, _ in self._spans(head, count) if count else ():
                removed.extend(self._ids[start:stop])  # type: ignore[arg-type]
                nothing = [None] * (stop - start)
                self._ids[start:stop] = nothing
                self._keys[start:stop] = nothing
                self._producers[start:stop] = nothing
                self._payloads[start:stop] = nothing
            self.head = head + count
            self.acked_total += len(offsets)
            if self.handing_over and self.cursor == self.head:
                self._transfer()
            return head, removed

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
