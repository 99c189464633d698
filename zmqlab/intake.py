"""The intake of a PUT part: check its records, place them in partitions, answer its ACK.

A part is one client's batch: a header of columns (``ids``, ``keys``, ``created_us``,
``sizes``) and one payload frame. Each record is judged on its own — stored, a duplicate of
one the broker already knows, or refused with a code — and the part's ACK says which, as
runs ``[index, count, partition, first offset]``. The checks and appends work on whole
columns (C loops); a record-by-record pass runs only for a part that has something wrong or
already known in it.

No sockets and no clock: the broker calls ``store`` for every part it accepts and ``need``
to decide whether a PUT must wait for room.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from zmqlab import protocol as proto
from zmqlab.dedupe import DedupeWindow
from zmqlab.errors import ErrorCode
from zmqlab.partition import Partition
from zmqlab.protocol import MAX_CREATED_US, MAX_ID_CHARS, MAX_KEY_CHARS


class Journal(Protocol):
    def append(self, partition: int, first: int, producer: str, ids: Sequence[str],
               keys: Sequence[str | None], created_us: Sequence[int],
               payloads: Sequence[bytes]) -> None: ...


Need = tuple[int, dict[int, int]]
"""The room a PUT waits for: (keyless records, keyed records per partition)."""

_INVALID = ErrorCode.INVALID_RECORD.value
_FULL = ErrorCode.PARTITION_FULL.value


def partition_of(key: str, partitions: int) -> int:
    """The partition of a keyed record: ``crc32(key) % partitions``, the one place it is
    computed. Every string here came through ``proto.parse_json``, which refuses lone
    surrogates, so ``encode`` cannot fail."""
    return zlib.crc32(key.encode()) % partitions


class Columns(NamedTuple):
    """A part's header columns, each a list with one value per record (not yet checked)."""

    ids: list[Any]
    keys: list[Any]
    created_us: list[Any]
    sizes: list[Any]

    @classmethod
    def of(cls, header: dict[str, Any]) -> Columns:
        ids = proto.require(header, "ids", list)
        count = len(ids)
        return cls(ids, proto.column(header, "keys", count, optional=True),
                   proto.column(header, "created_us", count), proto.column(header, "sizes", count))


class PartResult(NamedTuple):
    """A part's ACK body and what it did, for the broker's counters and log."""

    body: dict[str, Any]  # {"acks": runs, "dups": [[index, partition, offset]], "errors": …}
    stored: int
    duplicates: int
    refused: int


class Intake:
    """Stores PUT parts into ``partitions``, deduplicated against ``window``."""

    def __init__(self, partitions: list[Partition], window: DedupeWindow,
                 max_payload_bytes: int, journal: Journal | None = None) -> None:
        self.partitions = partitions
        self.window = window
        self.max_payload_bytes = max_payload_bytes
        self.journal = journal  # the broker's log: a run is written there before it counts
        self._next_keyless = 0  # the partition the next keyless run starts at

    # -- a part ------------------------------------------------------------------------------
    def store(self, header: dict[str, Any], blob: bytes, producer: str) -> PartResult:
        """Store one part's records: what fits and is valid is appended, in runs (a keyless
        run goes to one partition, the next run to the next: Kafka's sticky partitioner,
        which keeps batches whole on every later hop); the rest is answered per record."""
        columns = Columns.of(header)
        payloads = proto.split_payloads(columns.sizes, [blob])
        not_json = proto.invalid_objects(payloads, self.max_payload_bytes)
        errors: list[list[Any]] = []
        dups: list[list[Any]] = []
        repeats: list[int] = []
        if not not_json and self._all_new_and_valid(columns):
            accepted = list(range(len(columns.ids)))
        else:
            accepted = self._check_each(columns, not_json, errors, dups)
            ids = columns.ids
            if len({ids[i] for i in accepted}) != len(accepted):  # an id twice in a part
                seen: set[str] = set()
                unique: list[int] = []
                for i in accepted:
                    (repeats if ids[i] in seen else unique).append(i)
                    seen.add(ids[i])
                accepted = unique
        acks = self._place(accepted, columns, payloads, producer, errors)
        for index in repeats:
            known = self.locate(columns.ids[index], columns.keys[index])
            if known is not None:
                dups.append([index, *known])
            else:  # its first copy was refused: so is this one
                errors.append([index, _FULL, "the first copy of this id in the batch was "
                               "refused", True])
        errors.sort()
        stored = sum(run[1] for run in acks)
        return PartResult({"acks": acks, "dups": dups, "errors": errors}, stored, len(dups),
                          len(errors))

    def _all_new_and_valid(self, columns: Columns) -> bool:
        """The common case, a column at a time: every id a new, unique string of the allowed
        length, every key null or a short string, no NUL in either (no supported database
        stores it in text), every time an int from 1970 to 9999, every payload within the size
        limit. When False, ``_check_each`` finds out which record."""
        ids, keys, created, sizes = columns
        if not ids:
            return True
        if set(map(type, ids)) != {str} or set(map(type, created)) != {int}:
            return False
        if not (0 <= min(created) and max(created) <= MAX_CREATED_US):
            return False
        if not (0 < min(map(len, ids)) and max(map(len, ids)) <= MAX_ID_CHARS):
            return False
        if max(sizes) > self.max_payload_bytes or len(set(ids)) != len(ids):
            return False
        if "\x00" in "".join(ids):
            return False
        if keys.count(None) != len(keys):
            named = [k for k in keys if k is not None]
            if set(map(type, named)) != {str} or max(map(len, named)) > MAX_KEY_CHARS:
                return False
            if "\x00" in "".join(named):
                return False
        return self.window.all_new(ids)

    def _check_each(self, columns: Columns, not_json: set[int], errors: list[list[Any]],
                    dups: list[list[Any]]) -> list[int]:
        """Check records one by one: the accepted indices; refusals and retries recorded."""
        accepted: list[int] = []
        window = self.window
        max_bytes = self.max_payload_bytes
        after: tuple[int, int] | None = None  # where the next retried record probably is
        for index, (record_id, key, created_us, size) in enumerate(zip(*columns, strict=True)):
            if (type(record_id) is not str or not 0 < len(record_id) <= MAX_ID_CHARS
                    or "\x00" in record_id):
                errors.append([index, _INVALID, f"id must be a string of 1 to {MAX_ID_CHARS} "
                               "characters without NUL", False])
            elif key is not None and (type(key) is not str or len(key) > MAX_KEY_CHARS
                                      or "\x00" in key):
                errors.append([index, _INVALID, f"key must be null or a string of at most "
                               f"{MAX_KEY_CHARS} characters without NUL", False])
            elif type(created_us) is not int or not 0 <= created_us <= MAX_CREATED_US:
                errors.append([index, _INVALID,
                               "created_us must be an integer of microseconds of Unix time, "
                               "from 1970 up to the last day of year 9999", False])
            elif record_id in window and (known := self.locate(record_id, key, after)):
                dups.append([index, *known])  # an idempotent retry: the original position
                after = (known[0], known[1] + 1)
            elif size > max_bytes:
                errors.append([index, ErrorCode.TOO_LARGE.value,
                               f"payload of {size} bytes exceeds {max_bytes}", False])
            elif index in not_json:
                errors.append([index, _INVALID,
                               "payload must be one JSON object (UTF-8, no NaN or Infinity, "
                               "no lone surrogate)", False])
            else:
                accepted.append(index)
        return accepted

    def locate(self, record_id: str, key: str | None,
               after: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """Where a known id sits: held or recently acknowledged. A resent batch comes in the
        order it was stored, so each record is looked for first just after the one before it
        (``after``), then as the start of a run; only an id in the middle of a run resent on
        its own costs a scan."""
        if record_id in self.window.held:
            partitions = self.partitions
            if after is not None and partitions[after[0]].id_at(after[1]) == record_id:
                return after
            for partition in partitions:
                offset = partition.run_start(record_id)
                if offset is not None:
                    return partition.number, offset
            count = len(partitions)
            first = partition_of(key, count) if key is not None else 0
            for number in [first, *(n for n in range(count) if n != first)]:
                offset = partitions[number].find(record_id)
                if offset is not None:
                    return number, offset
        return self.window.acked_position(record_id)

    # -- placement ---------------------------------------------------------------------------
    def _place(self, accepted: list[int], columns: Columns, payloads: list[bytes],
               producer: str, errors: list[list[Any]]) -> list[list[int]]:
        """Append accepted records to their partitions; ACK runs, PARTITION_FULL for the rest."""
        partitions = self.partitions
        count = len(partitions)
        keys = columns.keys
        keyed: dict[int, list[int]] = {}
        keyless: list[int]
        if keys.count(None) == len(keys):
            keyless = accepted
        else:
            keyless = []
            for i in accepted:
                key = keys[i]
                if key is None:
                    keyless.append(i)
                else:
                    keyed.setdefault(partition_of(key, count), []).append(i)
        runs: list[list[int]] = []
        for number, indices in keyed.items():
            partition = partitions[number]
            try:
                left = self._append(partition, indices, columns, payloads, producer, runs)
            except OSError as exc:
                self._unwritten(indices, exc, errors)
                continue
            for i in left:
                errors.append([i, _FULL, f"partition {number} is full "
                               f"({partition.capacity} records); retry later", True])
        if keyless:
            start = self._next_keyless
            self._next_keyless = (start + 1) % count
            for step in range(count):
                try:
                    keyless = self._append(partitions[(start + step) % count], keyless, columns,
                                           payloads, producer, runs)
                except OSError as exc:
                    self._unwritten(keyless, exc, errors)
                    keyless = []
                if not keyless:
                    break
            for i in keyless:
                errors.append([i, _FULL, "every partition is full "
                               f"({partitions[0].capacity} records each); retry later", True])
        runs.sort()
        return runs

    @staticmethod
    def _unwritten(indices: list[int], exc: OSError, errors: list[list[Any]]) -> None:
        """Records whose log write failed are refused, retryably: nothing unwritten is acked."""
        errors.extend([i, ErrorCode.UNAVAILABLE.value, f"the broker could not write its log "
                       f"({exc.strerror or exc}); retry later", True] for i in indices)

    def _append(self, partition: Partition, indices: list[int], columns: Columns,
                payloads: list[bytes], producer: str, runs: list[list[int]]) -> list[int]:
        """Append what fits of ``indices`` to one partition (and to the journal); return the
        indices left over. OSError, with the partition as it was, if the journal failed."""
        room = partition.room
        if room <= 0:
            return indices
        lo = indices[0]
        if indices[-1] - lo == len(indices) - 1:  # consecutive (the usual case): slices
            hi = lo + min(len(indices), room)
            ids, keys = columns.ids[lo:hi], columns.keys[lo:hi]
            created, chosen = columns.created_us[lo:hi], payloads[lo:hi]
        else:
            ids = [columns.ids[i] for i in indices]
            keys = [columns.keys[i] for i in indices]
            created = [columns.created_us[i] for i in indices]
            chosen = [payloads[i] for i in indices]
        first, stored = partition.extend(ids, keys, producer, created, chosen)
        if self.journal is not None and stored:
            try:
                self.journal.append(partition.number, first, producer, ids[:stored],
                                    keys[:stored], created[:stored], chosen[:stored])
            except OSError:
                partition.truncate(first)
                raise
        self.window.hold(ids[:stored])
        number = partition.number
        if stored and indices[stored - 1] - indices[0] == stored - 1:  # consecutive: one run
            runs.append([indices[0], stored, number, first])
        else:
            for k in range(stored):
                i = indices[k]
                if runs and runs[-1][2] == number and runs[-1][0] + runs[-1][1] == i \
                        and runs[-1][3] + runs[-1][1] == first + k:
                    runs[-1][1] += 1
                else:
                    runs.append([i, 1, number, first + k])
        return indices[stored:]

    # -- room --------------------------------------------------------------------------------
    def need(self, headers: Sequence[dict[str, Any]]) -> Need | None:
        """The room these parts wait for, while some of their records would be refused for
        lack of it; None when they need not wait (they fit, or could never fit whole: then
        what fits is stored and the rest refused at once).

        It reads headers nobody checked yet, so anything odd in them counts as "no need to
        wait": storing the PUT then refuses what is wrong, with the reason."""
        need = self._count(headers, count_known=True)
        if need is None or self.room_for(need):
            return None
        need = self.count(headers)  # retries of known ids need no room
        if need is None or self.room_for(need):
            return None
        return need

    def count(self, headers: Sequence[dict[str, Any]]) -> Need | None:
        """The room the records these parts bring, less the known ones, take; None if they
        could never fit whole."""
        return self._count(headers, count_known=False)

    def room_for(self, need: Need) -> bool:
        keyless, keyed = need
        rooms = [p.room for p in self.partitions]
        if any(n > rooms[number] for number, n in keyed.items()):
            return False
        return keyless <= sum(rooms) - sum(keyed.values())

    def _count(self, headers: Sequence[dict[str, Any]], *, count_known: bool) -> Need | None:
        count = len(self.partitions)
        keyless = 0
        keyed: dict[int, int] = {}  # not a Counter: its __init__ runs in Python, once per PUT
        for header in headers:
            ids, keys = header.get("ids"), header.get("keys")
            if not isinstance(ids, list):
                continue
            if not isinstance(keys, str | list) or (isinstance(keys, list)
                                                    and len(keys) != len(ids)):
                keys = None
            fresh = None if count_known else self.window.unknown(ids)
            if not isinstance(keys, list):  # the usual case: no loop
                records = len(ids) if fresh is None else len(fresh)
                if keys is None:
                    keyless += records
                else:
                    number = partition_of(keys, count)
                    keyed[number] = keyed.get(number, 0) + records
                continue
            for record_id, key in zip(ids, keys, strict=True):
                if fresh is not None:
                    if record_id not in fresh:
                        continue
                    fresh.discard(record_id)  # a second copy in the part needs no room
                if isinstance(key, str):
                    number = partition_of(key, count)
                    keyed[number] = keyed.get(number, 0) + 1
                else:
                    keyless += 1
        capacity = sum(p.capacity for p in self.partitions)
        if (keyless + sum(keyed.values()) > capacity
                or max(keyed.values(), default=0) > self.partitions[0].capacity):
            return None
        return keyless, keyed
