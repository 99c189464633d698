"""The wire protocol: the only module that knows the order of frames.

Every message, after the ROUTER's routing frames and the empty delimiter, is::

    [VERSION, COMMAND, header, *payloads]

``header`` is a small JSON object. The payloads of a batch (PUT, RECORDS) travel as one frame:
the records' raw JSON bytes back to back, each record's size in its header entry. The broker
slices and joins them without decoding them. One frame per batch rather than one per record,
because a ZeroMQ frame costs far more Python to send than a slice costs to cut.

A PUT is one or more *parts* — (header, payload) frame pairs — and its ACK one header frame per
part: a producer service forwards the parts of several clients in one request, and hands each
client its part's answer, without decoding or re-encoding records. Acknowledgements are runs
(``[index, count, partition, first offset]``), and PUT and RECORDS headers are columns — one
JSON list per field — where a column whose records all share one value is sent as that value
once (``"keys": null`` for a keyless batch, one ``created_us`` for a batch made at once), so
the per-record share of every header is little more than an id; times travel as integer
microseconds (an int encodes faster than a float's repr). Consumers' DEALER sockets send the
empty delimiter that a REQ socket would add, so one parser serves both sides of the broker.
docs/protocol.md is the specification of every field; docs/performance.md has the figures.

Every decoder here bounds what it reads before it recurses or allocates, because every byte
it reads may come from anyone who can connect: a header frame is refused ``BAD_MESSAGE``
unparsed when it is larger than ``MAX_HEADER_BYTES`` or nests deeper than
``MAX_HEADER_DEPTH``; runs are refused before they are expanded past ``MAX_RUN_OFFSETS``;
payload sizes are checked before a payload is cut; and a payload nested too deep for the
JSON decoder is reported invalid, never raised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from zmqlab.errors import RETRYABLE, ErrorCode, ProtocolError

VERSION = b"ZQL4"  # ZQL4: consumer sessions and sequence numbers (docs/sessions.md)
EMPTY = b""

# The limits of a record, checked by the broker before it acknowledges anything, and the
# column sizes of the tables: a record the broker accepts must fit every supported database.
MAX_ID_CHARS = 128
MAX_KEY_CHARS = 1024
MAX_PAYLOAD_BYTES = 1_048_576  # the default; a broker may be configured lower or higher
MAX_NAME_CHARS = 255  # producer and consumer names (a name is stored with every record)
# One frame of any message (a PUT part's payloads, a RECORDS batch): every socket sets
# ZMQ_MAXMSGSIZE to this, so a peer cannot make a node allocate without bound; senders split
# what is bigger.
MAX_FRAME_BYTES = 64 * 1_048_576
# A header frame: twice the 8.5 MB of 1,000 records (a PUT part, a RECORDS batch) whose ids,
# keys and producer names are as long as allowed and all escaped (6 bytes a character).
MAX_HEADER_BYTES = 16 * 1_048_576
# JSON nesting of a header: zmqlab's own nest 5 deep at most (RECORDS: object, batches, batch,
# offsets, run), and a bound far under Python's recursion limit keeps every later recursion
# over a header (msgspec, repr, ==) shallow in any thread.
MAX_HEADER_DEPTH = 32
# Offsets that runs may name: each names a record whose id travels in the same header, and an
# id takes at least 4 bytes there ('"x",').
MAX_RUN_OFFSETS = MAX_HEADER_BYTES // 4
SOCKET_HWM = 1000  # messages queued per peer and direction before a socket pushes back
# 9999-12-31 00:00 UTC in microseconds: past year 9999 neither Python's datetime nor the
# databases hold a time; a day short, so a consumer's float seconds cannot round past it.
MAX_CREATED_US = 253_402_214_400_000_000


class Command(bytes, Enum):
    """Commands; the value is the frame sent on the wire."""

    HELLO = b"HELLO"  # both roles -> broker (and client -> producer service)
    WELCOME = b"WELCOME"  # answer to HELLO
    PUT = b"PUT"  # producer -> broker: a batch of records
    ACK = b"ACK"  # broker -> producer: per-record results; consumer -> broker: stored offsets
    ERR = b"ERR"  # any error reply
    FETCH = b"FETCH"  # consumer -> broker: credit (how many records it can hold)
    RECORDS = b"RECORDS"  # broker -> consumer: records of one partition and epoch
    ASSIGN = b"ASSIGN"  # broker -> consumer: the partitions it owns now
    HEARTBEAT = b"HEARTBEAT"  # both ways
    BYE = b"BYE"  # a node leaves
    STATS = b"STATS"  # request a status snapshot; the reply carries it


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message, without its routing envelope."""

    command: Command
    header: dict[str, Any] = field(default_factory=dict)
    payloads: tuple[bytes, ...] = ()
    raw_header: bytes = b""  # the header frame as received, for forwarding it untouched


_COMMANDS = {command.value: command for command in Command}
# msgspec's JSON codec, not the standard library's: several times faster on every hop, and
# strict where PostgreSQL is (NaN, Infinity, lone surrogates and invalid UTF-8 are refused at
# the broker, not by the database after the record was acknowledged).
_DECODE = msgspec.json.Decoder().decode
_DECODE_OBJECT = msgspec.json.Decoder(dict).decode
_ENCODE = msgspec.json.Encoder().encode


def parse_json(data: bytes) -> Any:
    """One JSON value from UTF-8 bytes; ValueError (with msgspec's reason) if it is not, or
    if it nests deeper than the decoder may recurse (msgspec raises RecursionError then)."""
    try:
        return _DECODE(data)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("JSON nested too deep to decode") from None


def invalid_objects(payloads: Sequence[bytes], max_bytes: int | None = None) -> set[int]:
    """Indices of the payloads that are not one JSON object each (none, nearly always: one
    pass in C finds that out, and only a batch with a bad payload is checked one by one).

    A payload nested deeper than the decoder may recurse (about Python's recursion limit,
    1,000 levels, less the stack in use) is one of them. So is one longer than ``max_bytes``,
    without being decoded: what it would allocate grows with its size (a payload of ``{},``
    repeated makes a 64-byte dict of every 3 bytes).
    """
    check = _DECODE_OBJECT
    if max_bytes is None or not payloads or max(map(len, payloads)) <= max_bytes:
        try:
            deque(map(check, payloads), 0)
            return set()
        except (msgspec.DecodeError, RecursionError):
            pass
    bad: set[int] = set()
    for index, payload in enumerate(payloads):
        if max_bytes is not None and len(payload) > max_bytes:
            bad.add(index)
            continue
        try:
            check(payload)
        except (msgspec.DecodeError, RecursionError):
            bad.add(index)
    return bad


def encode(command: Command, header: dict[str, Any] | None = None,
           payloads: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for a message; prepend routing frames (ROUTER) or nothing (REQ)."""
    return [VERSION, command.value, dump(header or {}), *payloads]


def encode_hello_producer(name: str) -> list[bytes]:
    """The HELLO a producer (a service, or a client of one) registers with."""
    return encode(Command.HELLO, {"role": "producer", "name": name})


def err_header(code: ErrorCode | str, reason: str, **extra: Any) -> dict[str, Any]:
    """The header of an ERR: ``code``, ``reason``, ``retryable`` (decided by the code)."""
    code = ErrorCode(code)
    return {"code": code.value, "reason": reason, "retryable": code in RETRYABLE, **extra}


def encode_err(code: ErrorCode | str, reason: str, **extra: Any) -> list[bytes]:
    return encode(Command.ERR, err_header(code, reason, **extra))


def decode(frames: Sequence[bytes]) -> Message:
    """Parse ``[VERSION, COMMAND, header, *payloads]``; raise ProtocolError with a clear reason."""
    if len(frames) < 3:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"expected at least 3 frames, got {len(frames)}")
    version, command, body = frames[0], frames[1], frames[2]
    if version != VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {version[:16]!r} not supported (this node speaks {VERSION!r})",
        )
    cmd = _COMMANDS.get(bytes(command))
    if cmd is None:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {command[:32]!r}")
    raw = bytes(body)
    return Message(cmd, parse_header(raw), tuple(bytes(f) for f in frames[3:]), raw)


def encode_parts(command: Command, bodies: Sequence[bytes]) -> list[bytes]:
    """A message whose header frames are already encoded (an ACK with one body per PUT part)."""
    return [VERSION, command.value, *bodies]


def dump(header: dict[str, Any]) -> bytes:
    return _ENCODE(header)


def put_parts(message: Message) -> list[tuple[bytes | dict[str, Any], bytes]]:
    """The (header, payload frame) parts of a PUT; every header after the first still raw.

    The first part's header is the message header (``decode`` parsed it); the others are
    parsed by whoever handles that part, so a bad one spoils only its own part.
    """
    rest = message.payloads
    if len(rest) % 2 != 1:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a PUT is (header, payload) frame pairs: "
                            f"got {len(rest) + 1} frames after the command")
    parts: list[tuple[bytes | dict[str, Any], bytes]] = [(message.header, rest[0])]
    parts.extend((rest[i], rest[i + 1]) for i in range(1, len(rest), 2))
    return parts


def parse_header(frame: bytes | dict[str, Any]) -> dict[str, Any]:
    """A header frame as a JSON object, or ProtocolError; a frame larger than
    ``MAX_HEADER_BYTES`` or nested deeper than ``MAX_HEADER_DEPTH`` is refused unparsed."""
    if isinstance(frame, dict):
        return frame
    if not frame:
        return {}
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header of {len(frame)} bytes is larger "
                            f"than {MAX_HEADER_BYTES}")
    if not nests_at_most(frame, MAX_HEADER_DEPTH):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header nests deeper than "
                            f"{MAX_HEADER_DEPTH} levels (or its brackets do not balance)")
    try:
        header = parse_json(frame)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header must be a JSON object")
    return header


_OPENERS = (b"[", b"{")
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
# Pieces are joined a chunk at a time: ``bytes.join`` takes an 80-byte buffer per piece.
_CHUNK_BYTES = 65_536


def nests_at_most(frame: bytes, limit: int) -> bool:
    """Whether JSON ``frame`` nests at most ``limit`` arrays and objects deep, in a few steps
    of C each (a frame whose brackets do not balance may count as deeper: it is not JSON).

    A frame with at most ``limit`` opening brackets cannot nest deeper: a count, or a few
    ``find`` calls (memchr) in a longer frame, tell, and nearly every header stops there
    (0.4 µs for a PUT of 100 records, 0.2 µs for a heartbeat).
    Otherwise the strings are cut out (brackets in them do not nest), every other byte but
    the brackets is dropped, and the innermost pairs are removed ``limit`` times: what is left
    nests deeper, or does not balance. Each step is linear in the frame and allocates about
    its size: a hostile frame of ``MAX_HEADER_BYTES`` costs 1-2 s, less than decoding the
    worst JSON of that size (``[[],[],…]``: 3 s and 20 times its size).
    """
    if len(frame) <= 512:  # two counts are cheaper than a find per bracket here
        if frame.count(b"[") + frame.count(b"{") <= limit:
            return True
        return _nests_at_most(frame, limit)
    budget = limit
    for opener in _OPENERS:
        at = frame.find(opener)
        while at >= 0:
            budget -= 1
            if budget < 0:
                return _nests_at_most(frame, limit)
            at = frame.find(opener, at + 1)
    return True


def _nests_at_most(frame: bytes, limit: int) -> bool:
    if b"\\" in frame:  # an escaped backslash or quote does not end a string
        frame = frame.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Brackets and quotes only; an empty string goes (two quotes side by side, whatever they
    # were, leave every other quote opening or closing what it did); then what is outside
    # the strings, every other piece between quotes.
    structure = frame.translate(_SQUARE, _NOT_STRUCTURE).replace(b'""', b"")
    outside: list[bytes] = []
    inside = 0  # whether the chunk starts inside a string
    for start in range(0, len(structure), _CHUNK_BYTES):
        pieces = structure[start:start + _CHUNK_BYTES].split(b'"')
        outside.append(b"".join(pieces[inside::2]))
        inside ^= (len(pieces) - 1) & 1
    brackets = b"".join(outside)
    for _ in range(limit):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return not brackets  # no pair left: done, or it does not balance
        brackets = shorter
    return not brackets


def to_runs(offsets: Sequence[int]) -> list[list[int]]:
    """Ascending offsets as runs ``[first, count]`` (a batch is one run unless it has holes)."""
    if offsets and offsets[-1] - offsets[0] == len(offsets) - 1:
        return [[offsets[0], len(offsets)]]
    runs: list[list[int]] = []
    for offset in offsets:
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += 1
        else:
            runs.append([offset, 1])
    return runs


def check_runs(runs: Sequence[Any]) -> int:
    """How many offsets runs ``[first, count > 0]`` name, or ProtocolError (nothing expanded)."""
    if not all(type(r) is list and len(r) == 2 and type(r[0]) is int and type(r[1]) is int
               and r[1] > 0 for r in runs):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "offsets must be runs [first offset, count > 0]")
    return sum(r[1] for r in runs)


def expand_runs(runs: Sequence[Sequence[int]]) -> list[int]:
    """The offsets of runs already checked (``check_runs``)."""
    if len(runs) == 1:
        return list(range(runs[0][0], runs[0][0] + runs[0][1]))
    return [o for first, count in runs for o in range(first, first + count)]


def from_runs(runs: Sequence[Any], limit: int = MAX_RUN_OFFSETS) -> list[int]:
    """The offsets of runs ``[first, count > 0]``, or ProtocolError; runs that name more than
    ``limit`` offsets are refused before they are expanded."""
    total = check_runs(runs)
    if total > limit:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"runs name {total} offsets, more than "
                            f"{limit}")
    return expand_runs(runs)


def compact(values: list[Any]) -> Any:
    """A column for the wire: the one value when every record has it, else the list.

    ``list.count`` makes the check a C loop; a column that varies costs one comparison per
    record to send, a constant one saves encoding and decoding a value per record.
    """
    if values and values.count(values[0]) == len(values):
        return values[0]
    return values


def column(header: dict[str, Any], name: str, count: int, *, optional: bool = False) -> list[Any]:
    """A header's column as a list of ``count`` values (see ``compact``), or ProtocolError;
    an optional column that is absent is all nulls."""
    if name not in header:
        if not optional:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header field {name!r} is missing")
        return [None] * count
    value = header[name]
    if type(value) is list:
        if len(value) != count:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name!r} has {len(value)} values for "
                                f"{count} records")
        return value
    if type(value) is dict:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name!r} must be a list or one value")
    return [value] * count


def join_payloads(payloads: Sequence[bytes]) -> list[bytes]:
    """The payload frame of a batch: the payloads back to back (their sizes go in the header)."""
    return [b"".join(payloads)]


def split_payloads(sizes: Sequence[Any], frames: Sequence[bytes]) -> list[bytes]:
    """Cut a batch's payload frame into one bytes object per record (together no more bytes
    than the frame, however many sizes there are)."""
    if not sizes:
        if any(frames):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "payload bytes but no records")
        return []
    if len(frames) != 1:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"expected one payload frame for the batch, got {len(frames)}")
    blob = frames[0]
    out: list[bytes] = []
    position = 0
    for size in sizes:
        if type(size) is not int or size < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"record size must be an integer >= 0, "
                                f"got {size!r:.40}")
        end = position + size
        out.append(blob[position:end])  # past the frame's end a slice is empty: no allocation
        position = end
    if position != len(blob):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"record sizes add up to {position} bytes but "
                            f"the payload frame has {len(blob)}")
    return out


MAX_ROUTE = 4  # frames before the delimiter: an identity and up to three request tags


def split_envelope(frames: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split a ROUTER message into (return route, message frames after the delimiter).

    The route is every frame before the first empty one, as ZeroMQ's own envelopes are: the
    ROUTER's identity of the sender, then whatever the sender put before the delimiter. A REQ
    client puts nothing there; a pipelined DEALER client puts a request tag, which comes back
    in front of the reply, so it can match replies to requests with many in flight. The route
    is echoed, never read: a node answers ``[*route, EMPTY, *reply]``.
    """
    for index in range(1, min(len(frames), MAX_ROUTE + 1)):
        if frames[index] == EMPTY:
            return [bytes(f) for f in frames[:index]], list(frames[index + 1:])
    raise ProtocolError(ErrorCode.BAD_MESSAGE, f"missing empty delimiter frame within the "
                        f"first {MAX_ROUTE + 1} frames (identity, request tags)")


def envelope(route: Sequence[bytes], body: Sequence[bytes]) -> list[bytes]:
    """The frames that send ``body`` back along ``route`` (see ``split_envelope``)."""
    return [*route, EMPTY, *body]


def require(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A header field of the given JSON type, or ProtocolError naming the field."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header field {name!r} must be {expected}")
    return value


def error_of(message: Message) -> tuple[str, str, bool]:
    """(code, reason, retryable) of an ERR message."""
    h = message.header
    return str(h.get("code", "INTERNAL")), str(h.get("reason", "")), bool(h.get("retryable"))
