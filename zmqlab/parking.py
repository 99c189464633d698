"""PUTs parked while the records they bring do not fit: the broker's backpressure.

A producer whose records would be refused PARTITION_FULL waits up to ``put_wait_ms`` for
consumers to acknowledge, with its reply held back (a REQ producer simply waits for it),
spending no CPU, instead of resending refused records in a loop and taking the CPU the
consumers need to make that room.

The room a PUT needs is counted once, when it is parked, so a wake-up only compares
numbers: wake-ups come after every consumer ACK while the queue is full.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from zmqlab.errors import ProtocolError
from zmqlab.intake import Need

MAX_PARKED = 1024  # PUTs waiting for room; beyond that a PUT that does not fit is refused

Part = tuple[dict[str, Any] | ProtocolError, bytes]
"""A PUT part: its parsed header (or why it could not be parsed) and its payload frame."""


@dataclass(slots=True)
class ParkedPut:
    """A PUT waiting for room, its reply held back."""

    route: list[bytes]  # the producer's identity, and its request tag if it pipelines
    parts: list[Part]
    deadline: float
    need: Need


class Parking:
    """Parked PUTs in arrival order."""

    def __init__(self, limit: int = MAX_PARKED) -> None:
        self.limit = limit
        self._parked: deque[ParkedPut] = deque()

    def __len__(self) -> int:
        return len(self._parked)

    def __iter__(self) -> Iterator[ParkedPut]:
        return iter(self._parked)

    @property
    def full(self) -> bool:
        return len(self._parked) >= self.limit

    @property
    def next_deadline(self) -> float | None:
        """When the oldest parked PUT must be answered (deadlines grow with arrival)."""
        return self._parked[0].deadline if self._parked else None

    def park(self, put: ParkedPut) -> None:
        self._parked.append(put)

    def holds(self, partitions: Iterable[int]) -> bool:
        """Whether a parked PUT waits with keyed records for one of ``partitions``: then a
        later PUT with keyed records for it waits behind, so one key keeps its order."""
        wanted = set(partitions)
        return any(not wanted.isdisjoint(put.need[1]) for put in self._parked)

    def release(self, now: float, fits: Callable[[Need], bool],
                answer: Callable[[ParkedPut], None], *, may_wait: bool = True) -> None:
        """``answer`` each PUT, oldest first, that fits now or whose wait is over (every one
        when ``may_wait`` is False); the others stay. Each is judged after the ones before
        it were answered, since storing them took room.

        Any PUT that fits goes, not only the oldest: a PUT waiting for one full keyed
        partition must not hold up others bound for partitions with room. But a PUT with
        keyed records for a partition that an older waiting PUT also has keyed records for
        stays behind it, so records of one key are stored in the order they came. A keyless
        or bigger PUT can be overtaken by small ones, for its wait at most.
        """
        waiting: deque[ParkedPut] = deque()
        parked, self._parked = self._parked, waiting
        held: set[int] = set()  # partitions with keyed records of a PUT still waiting
        while parked:
            put = parked.popleft()
            keyed = put.need[1]
            due = not may_wait or now >= put.deadline
            if not due and (not fits(put.need) or not held.isdisjoint(keyed)):
                waiting.append(put)
                held.update(keyed)
            else:
                answer(put)
