"""The decoders' bounds on their own: header size and depth, runs, payloads."""

from __future__ import annotations

import sys
import time
from typing import Any

import msgspec
import pytest
from helpers import depth_of
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqlab import protocol as proto
from zmqlab.errors import ProtocolError
from zmqlab.protocol import (
    MAX_CREATED_US,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_DEPTH,
    MAX_ID_CHARS,
    MAX_KEY_CHARS,
    MAX_NAME_CHARS,
)

# derandomize: the same examples on every run, so CI is reproducible; no example database.
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def nested(depth: int, opener: bytes = b"[", closed: bool = True) -> bytes:
    """A header ``{"a": …}`` whose value nests ``depth - 1`` more levels (``depth`` in all)."""
    close = {b"[": b"]", b'{"a":': b"}"}[opener]
    inner = opener * (depth - 1) + (b"1" + close * (depth - 1) if closed else b"")
    return b'{"a":' + inner + (b"}" if closed else b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail if msgspec is asked to decode a header: the bound must refuse it first."""
    def refuse(_data: bytes) -> Any:
        raise AssertionError("the header was decoded")
    monkeypatch.setattr(proto, "_DECODE", refuse)


# -- size ----------------------------------------------------------------------------------------
def test_a_header_of_max_header_bytes_is_parsed():
    pad = MAX_HEADER_BYTES - len(b'{"pad":""}')
    header = proto.parse_header(b'{"pad":"' + b"x" * pad + b'"}')
    assert len(header["pad"]) == pad


def test_a_header_one_byte_larger_is_refused_unparsed(no_decoding):
    with pytest.raises(ProtocolError, match="larger than") as refused:
        proto.parse_header(b" " * (MAX_HEADER_BYTES + 1))
    assert refused.value.code == "BAD_MESSAGE"


def test_the_largest_headers_a_node_sends_for_1000_records_fit():
    # Given 1,000 records with the longest ids, keys and producer names, all escaped control
    # characters (6 bytes each on the wire), the largest times and sizes
    count = 1000
    ids = [f"{i:04d}" + "\x01" * (MAX_ID_CHARS - 4) for i in range(count)]
    keys = [f"{i:04d}" + "\x1f" * (MAX_KEY_CHARS - 4) for i in range(count)]
    producers = [f"{i:04d}" + "\x02" * (MAX_NAME_CHARS - 4) for i in range(count)]
    created = [MAX_CREATED_US - i for i in range(count)]
    sizes = [MAX_FRAME_BYTES - i for i in range(count)]
    put = proto.dump({"ids": ids, "keys": keys, "created_us": created, "sizes": sizes})
    records = proto.dump({"batches": [{
        "partition": 0, "epoch": 2**40, "offsets": [[2 * i, 1] for i in range(count)],
        "ids": ids, "keys": keys, "producers": producers, "created_us": created,
        "attempts": [99] * count, "sizes": sizes}], "session": "f" * 32, "seq": 2**40})
    # Then a PUT part and a RECORDS batch of them are parsed, with room to spare
    for frame in (put, records):
        assert len(frame) < MAX_HEADER_BYTES * 0.6
        assert proto.parse_header(frame)


# -- depth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_a_header_nested_max_header_depth_deep_is_parsed(opener):
    header = proto.parse_header(nested(MAX_HEADER_DEPTH, opener))
    assert depth_of(header) == MAX_HEADER_DEPTH


@pytest.mark.parametrize("depth", [MAX_HEADER_DEPTH + 1, 1000, 100_000])
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
@pytest.mark.parametrize("closed", [True, False])
def test_a_header_nested_deeper_is_refused_unparsed(no_decoding, depth, opener, closed):
    with pytest.raises(ProtocolError, match="nests deeper") as refused:
        proto.parse_header(nested(depth, opener, closed))
    assert refused.value.code == "BAD_MESSAGE"


def test_brackets_and_escaped_quotes_inside_strings_do_not_nest():
    # Given a shallow header with many runs (so the quick count does not settle it) and keys
    # full of unbalanced brackets and escaped quotes
    keys = ["[" * 50, "]]]]" + '"' * 3 + "{{{", '\\"[[[', "\\", "\\\\]" * 40]
    header = {"keys": keys, "offsets": [[i, 1] for i in range(100)], "k": "]" * 64}
    # Then it is parsed whole
    assert proto.parse_header(proto.dump(header)) == header


def test_closing_brackets_inside_strings_cannot_hide_nesting(no_decoding):
    # Each level opens an array whose first element is a string of "]": deep, though its
    # brackets would balance if the strings were counted.
    frame = b'{"a":' + b'["]",' * 40 + b"1" + b"]" * 40 + b"}"
    with pytest.raises(ProtocolError, match="nests deeper"):
        proto.parse_header(frame)


def test_the_slowest_header_to_prescan_costs_seconds_not_minutes():
    # Blocks just deeper than the bound: every pass removes one pair of each.
    blocks = b"[" * (MAX_HEADER_DEPTH + 1) + b"]" * (MAX_HEADER_DEPTH + 1)
    frame = blocks * (MAX_HEADER_BYTES // len(blocks))
    began = time.monotonic()
    assert not proto.nests_at_most(frame, MAX_HEADER_DEPTH)
    assert time.monotonic() - began < 30  # about 1-2 s; a quadratic scan would take hours


JSON_LEAVES = (st.none() | st.booleans() | st.integers()
               | st.floats(allow_nan=False, allow_infinity=False)
               # the characters that matter to the scan, and any others
               | st.text(st.sampled_from('[]{}"\\,:x') | st.characters(), max_size=8))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=60)


@FAST
@given(JSON, st.integers(min_value=0, max_value=8))
def test_the_prescan_tells_the_depth_of_any_json_exactly(value, limit):
    assert proto.nests_at_most(proto.dump(value), limit) == (depth_of(value) <= limit)


@FAST
@given(st.binary(max_size=300) | st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\",
                                                          b",", b"1", b":", b'"a"']),
                                          max_size=120).map(b"".join))
def test_whatever_the_prescan_lets_through_msgspec_decodes_no_deeper(frame):
    try:
        value = msgspec.json.decode(frame)
    except msgspec.DecodeError:
        return
    if proto.nests_at_most(frame, 4):
        assert depth_of(value) <= 4


def test_a_header_refused_by_the_decoder_for_depth_is_a_bad_message_not_a_recursion_error():
    # The second line: with little stack left, msgspec raises RecursionError on a header the
    # prescan lets through; it is answered as a bad header all the same.
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    header, limit = nested(MAX_HEADER_DEPTH), sys.getrecursionlimit()
    refused: BaseException | None = None
    sys.setrecursionlimit(depth + 16)
    try:
        proto.parse_header(header)
    except BaseException as exc:  # what it raised is the point
        refused = exc
    finally:
        sys.setrecursionlimit(limit)
    assert isinstance(refused, ProtocolError), refused
    assert refused.code == "BAD_MESSAGE" and "nested too deep" in refused.reason


def test_parse_json_turns_a_recursion_error_into_value_error():
    with pytest.raises(ValueError, match="nested too deep"):
        proto.parse_json(b"[" * 100_000 + b"]" * 100_000)


# -- runs ----------------------------------------------------------------------------------------
def test_runs_naming_more_offsets_than_the_bound_are_refused_before_expansion():
    began = time.monotonic()
    with pytest.raises(ProtocolError, match="runs name 20000000 offsets"):
        proto.from_runs([[0, 20_000_000]])
    with pytest.raises(ProtocolError, match="more than 5"):
        proto.from_runs([[0, 3], [10, 3]], limit=5)
    assert time.monotonic() - began < 1
    assert proto.from_runs([[0, 3], [10, 2]], limit=5) == [0, 1, 2, 10, 11]


@FAST
@given(st.sets(st.integers(min_value=-(2**63), max_value=2**63), max_size=50))
def test_runs_round_trip(offsets):
    ascending = sorted(offsets)
    assert proto.from_runs(proto.to_runs(ascending)) == ascending


# -- payloads ------------------------------------------------------------------------------------
def test_a_payload_nested_100000_deep_is_invalid_not_a_recursion_error():
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert proto.invalid_objects([b"{}", deep, b'{"b":1}']) == {1}
    assert proto.invalid_objects([deep]) == {0}


def test_a_payload_longer_than_max_bytes_is_invalid_without_being_decoded(monkeypatch):
    decoded: list[bytes] = []
    check = proto._DECODE_OBJECT

    def counting(payload: bytes) -> Any:
        decoded.append(payload)
        return check(payload)

    monkeypatch.setattr(proto, "_DECODE_OBJECT", counting)
    bomb = b'{"a":[' + b"{}," * 1000 + b"{}]}"
    assert proto.invalid_objects([b"{}", bomb], max_bytes=100) == {1}
    assert bomb not in decoded
    assert proto.invalid_objects([b"{}", bomb]) == set()  # no bound given: decoded and valid


def test_record_sizes_that_do_not_add_up_cut_nothing_beyond_the_frame():
    with pytest.raises(ProtocolError, match="add up to"):
        proto.split_payloads([10**30, 5], [b"{}"])
    with pytest.raises(ProtocolError, match="got 'xxxxx"):
        proto.split_payloads([1, "x" * 10_000], [b"{}"])
