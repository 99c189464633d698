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
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

from zmqlab.errors import ErrorCode, LeaseError, ProtocolError
from zmqlab.protocol import check_runs, expand_runs

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
    sizes: list[int]


class Settled(NamedTuple):
    """What an ACK took out of the ring: always a run from the old head."""

    first: int  # the offset of the first record removed
    ids: list[str]  # the ids removed, in offset order
    dead: set[int]  # the removed offsets that were acknowledged as dead letters


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
        self._dead: set[int] = set()  # offsets acknowledged as dead letters, not yet removed
        # The first id of every appended run, so a resent batch is found without a scan.
        self._run_starts: dict[str, int] = {}
        self._run_order: deque[tuple[int, str]] = deque()
        # (end offset, time) of every delivery still in flight, oldest first: the deadline.
        self._deliveries: deque[tuple[int, float]] = deque()
        # Told of every release (partition, first, end, counted): the broker's log keeps
        # attempt counts across restarts.
        self.on_release: Callable[[int, int, int, bool], None] | None = None
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
            self._run_starts[ids[0]] = first
            self._run_order.append((first, ids[0]))
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

    def take(self, limit: int, now: float = 0.0, max_bytes: int | None = None) -> Taken:
        """Hand out up to ``limit`` pending records, and at most ``max_bytes`` of payload
        unless one record alone is more (they become in flight, and stay here); ``now`` starts
        their in-flight clock."""
        with self.lock:
            start = self.cursor
            end = min(self.tail, start + limit)
            out = self._columns(start, end)
            if max_bytes is not None and len(out.sizes) > 1 and sum(out.sizes) > max_bytes:
                fit = max(1, bisect_right(list(accumulate(out.sizes)), max_bytes))
                offsets = [o for first, count in out.offsets for o in range(first, first + count)]
                end = offsets[fit - 1] + 1
                out = self._columns(start, end)
            self.cursor = end
            if end > start:
                self._deliveries.append((end, now))
            return out

    @property
    def oldest_delivery(self) -> float | None:
        """When the oldest delivery still in flight was handed out, or None."""
        return self._deliveries[0][1] if self._deliveries else None

    def _columns(self, start: int, end: int) -> Taken:
        taken = Taken([], [], [], [], [], [], [], [])
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
        taken.sizes.extend(map(len, taken.payloads[len(taken.sizes):]))

    def id_at(self, offset: int) -> str | None:
        """The id held at ``offset``, or None (acknowledged, or not written yet)."""
        if not self.head <= offset < self.tail:
            return None
        return self._ids[offset % self.capacity]

    def run_start(self, record_id: str) -> int | None:
        """The offset of a held record that was the first of its run (what a resent batch
        starts with), at once; None for any other id."""
        offset = self._run_starts.get(record_id)
        return offset if offset is not None and offset >= self.head else None

    def find(self, record_id: str) -> int | None:
        """The offset of a held record by id (a scan: see ``run_start`` first)."""
        with self.lock:
            try:
                slot = self._ids.index(record_id)
            except ValueError:
                return None
            return self.head + (slot - self.head) % self.capacity

    def ack(self, owner: str, epoch: int, runs: Sequence[Any],
            dead: Sequence[Any] = ()) -> Settled:
        """Settle acknowledged records (``runs`` of ``[first offset, count]``; ``dead``: the
        ones the consumer buried); refuse, changing nothing, stale, foreign or unknown ones.

        Runs are checked against what is in flight before they are expanded, so a hostile
        ACK costs no more than the records it could name. Records leave the ring as a run from
        the head: out-of-order ACKs wait above it until the head is acknowledged. If the
        partition was being handed over and nothing is in flight any more, the lease moves.
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
            offsets = self._in_flight(runs)
            if dead:
                named = set(offsets)
                if not all(type(o) is int and o in named for o in dead):
                    raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                        "dead must list some of the acknowledged offsets")
            head, count = self.head, len(offsets)
            contiguous = (not self._acked and head + count <= self.cursor
                          and offsets == list(range(head, head + count)))
            if not contiguous and (self._acked.intersection(offsets)
                                   or len(set(offsets)) != count):
                raise LeaseError(ErrorCode.UNKNOWN_OFFSET,
                                 f"an offset is acknowledged twice in partition {self.number}")
            settled = self._settle(offsets, dead, contiguous)
            if self.handing_over and self.cursor == self.head:
                self._transfer()
            return settled

    def _settle(self, offsets: list[int], dead: Sequence[int], contiguous: bool) -> Settled:
        """Mark ``offsets`` acknowledged and remove the run from the head that is now done."""
        head, count = self.head, len(offsets)
        if not contiguous:  # the general case: out-of-order ACKs wait above the head
            self._acked.update(offsets)
            count = 0
            while head + count in self._acked:
                self._acked.discard(head + count)
                count += 1
        self._dead.update(dead)
        removed: list[str] = []
        for start, stop, _, _ in self._spans(head, count) if count else ():
            removed.extend(self._ids[start:stop])  # type: ignore[arg-type]
            nothing = [None] * (stop - start)
            self._ids[start:stop] = nothing
            self._keys[start:stop] = nothing
            self._producers[start:stop] = nothing
            self._payloads[start:stop] = nothing
        self.head = head + count
        self.cursor = max(self.cursor, self.head)
        self.acked_total += len(offsets)
        buried: set[int] = set()
        if self._dead and count:
            buried = self._dead.intersection(range(head, self.head))
            self._dead -= buried
        self._forget_below(self.head)
        return Settled(head, removed, buried)

    def _in_flight(self, runs: Sequence[Any]) -> list[int]:
        """The offsets of ``runs``, each checked to be in flight before any is expanded."""
        total = check_runs(runs)
        for first, count in runs:
            if first < self.head or first + count > self.cursor:
                raise LeaseError(ErrorCode.UNKNOWN_OFFSET,
                                 f"offsets {first}..{first + count - 1} are not in flight in "
                                 f"partition {self.number} (in flight: [{self.head}, "
                                 f"{self.cursor}))")
        if total > self.cursor - self.head:
            raise LeaseError(ErrorCode.UNKNOWN_OFFSET, "more offsets than are in flight")
        return expand_runs(runs)

    def _forget_below(self, head: int) -> None:
        """Drop the run starts and deliveries that the head has passed."""
        order, starts = self._run_order, self._run_starts
        while order and order[0][0] < head:
            starts.pop(order.popleft()[1], None)
        deliveries = self._deliveries
        while deliveries and deliveries[0][0] <= head:
            deliveries.popleft()

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

    def owner_gone(self, count_attempt: bool = True) -> int:
        """The owner died or left: release its in-flight records and move the lease.

        Released records go back to the head of the partition, so the next owner receives
        them first, in order; their attempt is raised unless the release was not the records'
        fault (``count_attempt`` False: a lost session, a clean stop). Returns how many were
        released.
        """
        with self.lock:
            released = self._release(count_attempt)
            self._transfer()
            return released

    def fence(self, count_attempt: bool = True) -> int:
        """Release what is in flight and start a new epoch (with the same owner, or the next
        one if the lease was being handed over): late ACKs of the old epoch are refused, the
        records are delivered again. Returns how many."""
        with self.lock:
            released = self._release(count_attempt)
            if self.handing_over:
                self._transfer()  # nothing in flight now: the lease moves (a new epoch)
            else:
                self.epoch += 1
            return released

    def _release(self, count_attempt: bool = True) -> int:
        if self.on_release is not None and self.cursor > self.head:
            self.on_release(self.number, self.head, self.cursor, count_attempt)
        count = 0
        attempts = self._attempts
        for offset in range(self.head, self.cursor):
            if offset not in self._acked:
                if count_attempt:
                    slot = offset % self.capacity
                    attempts[slot] = min(attempts[slot] + 1, MAX_ATTEMPT)
                count += 1
        self.cursor = self.head
        self._deliveries.clear()
        # Out-of-order ACKs above head stay acknowledged: those records are stored already.
        self.released_total += count
        return count

    def _transfer(self) -> None:
        if self.cursor != self.head:
            self._release()
        if self.owner != self.target:
            self.owner = self.target
            self.epoch += 1

    # -- recovery from the broker's log ---------------------------------------------------------
    def restore_position(self, tail: int) -> None:
        """Offsets below ``tail`` were all acknowledged (their log segments are gone): an
        empty partition starts there, so offsets never go backwards."""
        with self.lock:
            if self.tail < tail and self.head == self.tail:
                self.head = self.cursor = self.tail = tail

    def restore_append(self, first: int, ids: list[str], keys: list[str | None], producer: str,
                       created_us: list[int], payloads: list[bytes]) -> None:
        """Replay an appended run (nothing in flight during recovery)."""
        if first + len(ids) <= self.tail:
            return
        if first != self.tail:
            raise ValueError(f"partition {self.number}: the log appends at {first} but the "
                             f"partition ends at {self.tail}")
        _, stored = self.extend(ids, keys, producer, created_us, payloads)
        if stored < len(ids):
            raise ValueError(f"partition {self.number}: the log holds more records than its "
                             f"capacity ({self.capacity}); start with a larger --capacity")
        self.cursor = self.head

    def restore_ack(self, runs: list[list[int]], dead: list[int]) -> None:
        """Replay settled runs; what is already below the head is skipped."""
        with self.lock:
            offsets = [o for first, count in runs for o in range(first, first + count)
                       if self.head <= o < self.tail and o not in self._acked]
            if offsets:
                self.cursor = self.tail
                self._settle(offsets, [o for o in dead if o in set(offsets)], False)
                self.cursor = self.head

    def restore_release(self, start: int, end: int, counted: bool) -> None:
        """Replay a release: the records not acknowledged then get their attempt raised."""
        if not counted:
            return
        with self.lock:
            attempts = self._attempts
            for offset in range(max(start, self.head), min(end, self.tail)):
                if offset not in self._acked:
                    slot = offset % self.capacity
                    attempts[slot] = min(attempts[slot] + 1, MAX_ATTEMPT)

    def held_ids(self) -> list[str]:
        """The ids of every record held, in offset order."""
        with self.lock:
            ids: list[str] = []
            for start, stop, _, _ in self._spans(self.head, self.depth) if self.depth else ():
                ids.extend(self._ids[start:stop])  # type: ignore[arg-type]
            return ids

    def truncate(self, tail: int) -> None:
        """Take back the records appended from ``tail`` on (their log write failed)."""
        with self.lock:
            for start, stop, _, _ in self._spans(tail, self.tail - tail) if self.tail > tail \
                    else ():
                nothing = [None] * (stop - start)
                self._ids[start:stop] = nothing
                self._keys[start:stop] = nothing
                self._producers[start:stop] = nothing
                self._payloads[start:stop] = nothing
            self.appended_total -= self.tail - tail
            self.tail = tail
            if self._run_order and self._run_order[-1][0] >= tail:
                self._run_starts.pop(self._run_order.pop()[1], None)

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
