"""The broker's write-ahead log: what it accepted is on disk before its producer hears ACK.

One log for every partition, in segments ``<seq>.wal``, so one ``fdatasync`` covers all
that a pass of the poll loop accepted (group commit, as PostgreSQL's WAL and Kafka's flush
batches do). An entry is::

    [u32 body length][u32 crc32 of kind + body][u8 kind][body]

- ``APPEND``: a run of one partition as the broker holds it (the part's columns and its
  payload bytes back to back, not a re-encoding per record);
- ``ACK``: runs settled by the owner (no fsync of its own: losing it means redelivery, and
  the sink's primary key absorbs that);
- ``RELEASE``: in-flight records given back, so attempt counts survive a restart;
- ``CHECKPOINT``: every partition's head and tail, first in each segment, so offsets never go
  backwards even when every segment before it was deleted.

Segments are deleted oldest first, each once every record it appended is acknowledged: the
log always starts at a segment boundary, so replaying what is left is exact (a record stuck
unacknowledged keeps its segment and the later ones, as a log start offset does in Kafka).
Recovery reads segments in order and stops at the first entry whose length or checksum is
wrong: that torn or corrupt tail is cut off (the file truncated, later segments removed),
never replayed.
A failed ``fsync`` is fatal (a retried fsync can report success for pages the kernel already
dropped: PostgreSQL's lesson); a failed write refuses what it would have acknowledged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

import msgspec

from zmqlab.errors import ConfigError, ZmqlabError
from zmqlab.partition import Partition

log = logging.getLogger("zmqlab.wal")

_HEAD = struct.Struct("<IIB")  # body length, crc32(kind + body), kind
_APPEND = struct.Struct("<HQI")  # partition, first offset, columns length
_ACK = struct.Struct("<H")  # partition
_RELEASE = struct.Struct("<HQQB")  # partition, first offset, end offset, counted
MAX_ENTRY_BYTES = 1 << 31
SEGMENT_BYTES = 64 * 1_048_576
_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode


class Kind(IntEnum):
    APPEND = 1
    ACK = 2
    RELEASE = 3
    CHECKPOINT = 4


class Fsync(StrEnum):
    """When the log is flushed to disk, and so what an ACK to a producer promises."""

    BATCH = "batch"  # before the ACKs of each pass of the poll loop: nothing acked is lost
    INTERVAL = "interval"  # every interval, ACKs at once: a power loss loses up to an interval
    OFF = "off"  # when the kernel decides: a power loss loses what it had not written


class DiskFailure(ZmqlabError):
    """The log could not be made durable; the broker must stop (it acknowledged nothing
    that depends on it)."""


@dataclass
class Segment:
    seq: int
    path: str
    size: int = 0
    last_offset: dict[int, int] = field(default_factory=dict)  # partition -> last appended
    bytes_of: dict[int, int] = field(default_factory=dict)  # partition -> APPEND bytes


@dataclass(frozen=True, slots=True)
class Append:
    partition: int
    first: int
    producer: str
    ids: list[str]
    keys: list[str | None]
    created_us: list[int]
    payloads: list[bytes]


@dataclass(frozen=True, slots=True)
class Ack:
    partition: int
    runs: list[list[int]]
    dead: list[int]


@dataclass(frozen=True, slots=True)
class Release:
    partition: int
    start: int
    end: int
    counted: bool


@dataclass(frozen=True, slots=True)
class Checkpoint:
    positions: list[list[int]]  # [head, tail] per partition


Entry = Append | Ack | Release | Checkpoint


def _column(value: Any, count: int) -> list[Any]:
    return value if type(value) is list else [value] * count


def _compact(values: list[Any]) -> Any:
    return values[0] if values and values.count(values[0]) == len(values) else values


def encode_append(partition: int, first: int, producer: str, ids: Sequence[str],
                  keys: Sequence[str | None], created_us: Sequence[int],
                  payloads: Sequence[bytes]) -> bytes:
    sizes = list(map(len, payloads))
    columns = _ENCODE({"producer": producer, "ids": list(ids), "keys": _compact(list(keys)),
                       "created_us": _compact(list(created_us)), "sizes": _compact(sizes)})
    return _entry(Kind.APPEND, b"".join(
        (_APPEND.pack(partition, first, len(columns)), columns, *payloads)))


def _entry(kind: Kind, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(bytes((kind,))))
    return _HEAD.pack(len(body), crc, kind) + body


def _decode(kind: int, body: bytes) -> Entry:
    if kind == Kind.APPEND:
        partition, first, length = _APPEND.unpack_from(body)
        start = _APPEND.size
        columns = _DECODE(body[start:start + length])
        ids = columns["ids"]
        count = len(ids)
        sizes = _column(columns["sizes"], count)
        payloads, position = [], start + length
        for size in sizes:
            payloads.append(body[position:position + size])
            position += size
        return Append(partition, first, columns["producer"], ids,
                      _column(columns["keys"], count), _column(columns["created_us"], count),
                      payloads)
    if kind == Kind.ACK:
        (partition,) = _ACK.unpack_from(body)
        data = _DECODE(body[_ACK.size:])
        return Ack(partition, data["runs"], data["dead"])
    if kind == Kind.RELEASE:
        partition, start_offset, end, counted = _RELEASE.unpack_from(body)
        return Release(partition, start_offset, end, bool(counted))
    if kind == Kind.CHECKPOINT:
        return Checkpoint(_DECODE(body)["positions"])
    raise ValueError(f"unknown entry kind {kind}")


def read_segment(path: str) -> tuple[list[Entry], int, str | None]:
    """The entries of one segment file, the length of its good prefix, and why the rest (if
    any) is not good."""
    with open(path, "rb") as handle:
        data = handle.read()
    entries: list[Entry] = []
    position = 0
    while position < len(data):
        if len(data) - position < _HEAD.size:
            return entries, position, "a torn entry header at the end"
        length, crc, kind = _HEAD.unpack_from(data, position)
        start = position + _HEAD.size
        body = data[start:start + length]
        if len(body) != length:
            return entries, position, "a torn entry at the end"
        if zlib.crc32(body, zlib.crc32(bytes((kind,)))) != crc:
            return entries, position, f"a bad checksum at byte {position}"
        try:
            entries.append(_decode(kind, body))
        except (ValueError, KeyError, TypeError, struct.error, msgspec.DecodeError) as exc:
            return entries, position, f"an entry that does not decode at byte {position}: {exc}"
        position = start + length
    return entries, position, None


class Log:
    """The write-ahead log of one broker, in ``directory``."""

    def __init__(self, directory: str, partitions: int, *, fsync: Fsync = Fsync.BATCH,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.partitions = partitions
        self.fsync = Fsync(fsync)
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self._fd = -1
        self._dirty = False
        self.syncs = 0
        self.synced_entries = 0
        self._unsynced = 0
        try:
            os.makedirs(directory, exist_ok=True)
            self._lock = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot use data dir {directory}: {exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise ConfigError(f"data dir {directory} is in use by another broker") from None

    # -- recovery ----------------------------------------------------------------------------
    def recover(self) -> Iterator[Entry]:
        """Every good entry, oldest first; a torn or corrupt tail is cut off on the way."""
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".wal"))
        for index, name in enumerate(names):
            path = os.path.join(self.directory, name)
            entries, good, problem = read_segment(path)
            segment = Segment(int(name[:-4]), path, good)
            for entry in entries:
                if isinstance(entry, Append):
                    end = entry.first + len(entry.ids) - 1
                    segment.last_offset[entry.partition] = end
                    size = sum(map(len, entry.payloads))
                    segment.bytes_of[entry.partition] = segment.bytes_of.get(
                        entry.partition, 0) + size
                elif isinstance(entry, Checkpoint) and len(entry.positions) != self.partitions:
                    raise ConfigError(f"data dir {self.directory} was written with "
                                      f"{len(entry.positions)} partitions, not {self.partitions}")
            self.segments.append(segment)
            yield from entries
            if problem is not None:
                later = names[index + 1:]
                log.warning("log segment %s: %s; cut off %d byte(s) and %d later segment(s)",
                            name, problem, os.path.getsize(path) - good, len(later))
                os.truncate(path, good)
                for other in later:
                    os.unlink(os.path.join(self.directory, other))
                break

    def open(self, positions: list[list[int]]) -> None:
        """Start writing: a new segment that begins with where every partition stands."""
        self._roll(positions)

    # -- writing ------------------------------------------------------------------------------
    def append(self, partition: int, first: int, producer: str, ids: Sequence[str],
               keys: Sequence[str | None], created_us: Sequence[int],
               payloads: Sequence[bytes]) -> None:
        """Write a run appended to ``partition`` (OSError if it could not be written)."""
        entry = encode_append(partition, first, producer, ids, keys, created_us, payloads)
        self._write(entry)
        segment = self.segments[-1]
        segment.last_offset[partition] = first + len(ids) - 1
        segment.bytes_of[partition] = segment.bytes_of.get(partition, 0) + sum(map(len, payloads))

    def ack(self, partition: int, runs: list[list[int]], dead: list[int]) -> None:
        self._write_quietly(_entry(Kind.ACK, _ACK.pack(partition) + _ENCODE(
            {"runs": runs, "dead": dead})))

    def release(self, partition: int, start: int, end: int, counted: bool) -> None:
        self._write_quietly(_entry(Kind.RELEASE, _RELEASE.pack(partition, start, end,
                                                               int(counted))))

    def _write_quietly(self, entry: bytes) -> None:
        """Progress entries: losing one means redelivery, not loss, so a failed write is
        logged and the broker carries on."""
        try:
            self._write(entry)
        except OSError as exc:
            log.warning("could not write ACK progress to the log (records may be delivered "
                        "again after a restart): %s", exc)

    def _write(self, entry: bytes) -> None:
        written = os.write(self._fd, entry)
        if written != len(entry):  # a short write (disk full): cut it, so no torn entry stays
            os.ftruncate(self._fd, self.segments[-1].size)
            raise OSError(28, "short write to the log (disk full?)")
        self.segments[-1].size += written
        self._dirty = True
        self._unsynced += 1

    def sync(self) -> None:
        """Make everything written so far durable (one fdatasync), or raise DiskFailure."""
        if not self._dirty:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise DiskFailure(f"fsync of the log failed: {exc}; stopping, since a retried "
                              "fsync can report success for data that is gone") from exc
        self._dirty = False
        self.syncs += 1
        self.synced_entries += self._unsynced
        self._unsynced = 0

    def maybe_roll(self, positions: list[list[int]]) -> None:
        """Start a new segment when the current one is full."""
        if self.segments and self.segments[-1].size >= self.segment_bytes:
            self._roll(positions)

    def _roll(self, positions: list[list[int]]) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
        seq = self.segments[-1].seq + 1 if self.segments else 1
        path = os.path.join(self.directory, f"{seq:020d}.wal")
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.segments.append(Segment(seq, path))
            self._write(_entry(Kind.CHECKPOINT, _ENCODE({"positions": positions})))
            self.sync()
            self._sync_directory()
        except OSError as exc:
            raise DiskFailure(f"cannot start log segment {path}: {exc}") from exc

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- cleaning -----------------------------------------------------------------------------
    def delete_settled(self, heads: Sequence[int]) -> int:
        """Delete the oldest segments (never the one being written) while every record each
        appended is acknowledged; returns how many."""
        deleted = 0
        while len(self.segments) > 1 and all(
                heads[p] > last for p, last in self.segments[0].last_offset.items()):
            os.unlink(self.segments.pop(0).path)
            deleted += 1
        if deleted:
            self._sync_directory()
        return deleted

    def disk_use(self) -> list[dict[str, int]]:
        """Per partition: payload bytes and segments on disk that hold its records."""
        out = [{"disk_bytes": 0, "segments": 0} for _ in range(self.partitions)]
        for segment in self.segments:
            for partition, size in segment.bytes_of.items():
                out[partition]["disk_bytes"] += size
                out[partition]["segments"] += 1
        return out

    def close(self) -> None:
        """Flush and close; a failure here was already reported by the sync that failed."""
        if self._fd >= 0:
            try:
                self.sync()
            except DiskFailure:
                log.error("the log could not be flushed on close")
            finally:
                os.close(self._fd)
                self._fd = -1
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def restore(log: Log, partitions: Sequence[Partition]) -> int:
    """Rebuild ``partitions`` from the log: records not acknowledged come back in their
    order with their ids, offsets and attempt counts. Returns how many are held."""
    first_checkpoint = True
    for entry in log.recover():
        if isinstance(entry, Append):
            partitions[entry.partition].restore_append(
                entry.first, entry.ids, entry.keys, entry.producer, entry.created_us,
                entry.payloads)
        elif isinstance(entry, Ack):
            partitions[entry.partition].restore_ack(entry.runs, entry.dead)
        elif isinstance(entry, Release):
            partitions[entry.partition].restore_release(entry.start, entry.end, entry.counted)
        elif first_checkpoint:  # what came before the oldest segment was all acknowledged
            first_checkpoint = False
            for partition, (_, tail) in zip(partitions, entry.positions, strict=True):
                partition.restore_position(tail)
    return sum(p.depth for p in partitions)
