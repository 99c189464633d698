"""A PUT part's intake on its own: checks, placement, duplicates, the room a PUT needs."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from zmqlab import protocol as proto
from zmqlab.dedupe import DedupeWindow
from zmqlab.errors import ProtocolError
from zmqlab.intake import Intake, partition_of
from zmqlab.partition import Partition


def make(partitions: int = 3, capacity: int = 10, max_payload_bytes: int = 100) -> Intake:
    return Intake([Partition(n, capacity) for n in range(partitions)], DedupeWindow(100),
                  max_payload_bytes)


def part(ids: list[Any], keys: Any = None, created_us: Any = 1_000_000,
         payloads: list[bytes] | None = None) -> tuple[dict[str, Any], bytes]:
    payloads = payloads if payloads is not None else [b"{}"] * len(ids)
    header = {"ids": ids, "keys": keys, "created_us": created_us,
              "sizes": [len(p) for p in payloads]}
    return header, b"".join(payloads)


def test_a_keyless_part_is_one_run_and_the_next_part_starts_at_the_next_partition():
    intake = make()
    first = intake.store(*part(["a", "b"]), producer="8080")
    second = intake.store(*part(["c"]), producer="8080")
    assert first.body == {"acks": [[0, 2, 0, 0]], "dups": [], "errors": []}
    assert second.body["acks"] == [[0, 1, 1, 0]]
    assert (first.stored, first.duplicates, first.refused) == (2, 0, 0)
    assert intake.window.held == {"a", "b", "c"}


def test_keyed_records_go_to_crc32_of_their_key():
    intake = make(partitions=6)
    result = intake.store(*part(["a", "b"], keys=["k1", "k2"]), producer="8080")
    where = {run[0]: run[2] for run in result.body["acks"]}
    assert where == {0: zlib.crc32(b"k1") % 6, 1: zlib.crc32(b"k2") % 6}
    assert partition_of("k1", 6) == zlib.crc32(b"k1") % 6


def test_a_retry_is_answered_with_the_first_position_held_or_acknowledged():
    intake = make()
    intake.store(*part(["a", "b"]), producer="8080")
    again = intake.store(*part(["a", "b", "c"]), producer="8080")
    assert again.body["dups"] == [[0, 0, 0], [1, 0, 1]] and again.stored == 1
    partition = intake.partitions[0]
    partition.want_owner("9090")
    partition.take(10)
    settled = partition.ack("9090", partition.epoch, [[0, 2]])
    intake.window.settle(0, settled.first, settled.ids)
    once_more = intake.store(*part(["a"]), producer="8080")
    assert once_more.body["dups"] == [[0, 0, 0]] and once_more.stored == 0


def test_an_id_twice_in_one_part_is_stored_once_and_the_copy_is_its_duplicate():
    intake = make()
    result = intake.store(*part(["a", "a"]), producer="8080")
    assert result.body["acks"] == [[0, 1, 0, 0]] and result.body["dups"] == [[1, 0, 0]]


@pytest.mark.parametrize(("ids", "keys", "created", "payload", "code"), [
    ([""], None, 1, b"{}", "INVALID_RECORD"),
    (["x" * 129], None, 1, b"{}", "INVALID_RECORD"),
    ([7], None, 1, b"{}", "INVALID_RECORD"),
    (["a"], ["k" * 1025], 1, b"{}", "INVALID_RECORD"),
    (["a"], None, -1, b"{}", "INVALID_RECORD"),
    (["a"], None, proto.MAX_CREATED_US + 1, b"{}", "INVALID_RECORD"),
    (["a"], None, 1, b"[1]", "INVALID_RECORD"),
    (["a"], None, 1, b'{"a": NaN}', "INVALID_RECORD"),
    (["a"], None, 1, b'{"pad": "' + b"x" * 200 + b'"}', "TOO_LARGE"),
])
def test_each_bad_record_is_refused_for_good_and_the_rest_still_stored(ids, keys, created,
                                                                        payload, code):
    intake = make()
    header, blob = part([*ids, "good"], keys=None if keys is None else [*keys, None],
                        created_us=[created, 1], payloads=[payload, b"{}"])
    result = intake.store(header, blob, producer="8080")
    (index, got, _reason, retryable), = result.body["errors"]
    assert (index, got, retryable) == (0, code, False)
    assert result.body["acks"] == [[1, 1, 0, 0]]


def test_what_does_not_fit_is_refused_retryably_and_nothing_is_overwritten():
    intake = make(partitions=2, capacity=1)
    result = intake.store(*part(["a", "b", "c"]), producer="8080")
    assert result.stored == 2
    (index, code, _reason, retryable), = result.body["errors"]
    assert (index, code, retryable) == (2, "PARTITION_FULL", True)
    assert intake.window.held == {"a", "b"}


def test_a_part_whose_columns_disagree_is_refused_whole():
    intake = make()
    with pytest.raises(ProtocolError):
        intake.store({"ids": ["a", "b"], "created_us": 1, "sizes": [2]}, b"{}", producer="p")


def test_need_counts_the_room_a_put_waits_for_and_none_when_it_fits_or_never_can():
    intake = make(partitions=2, capacity=2)
    assert intake.need([part(["a", "b", "c"])[0]]) is None  # fits now
    intake.store(*part(["a", "b", "c"]), producer="8080")
    need = intake.need([part(["d", "e"])[0]])
    assert need == (2, {}) and not intake.room_for(need)
    assert intake.need([part(["a", "b"])[0]]) is None  # known ids need no room
    assert intake.need([part([f"n{i}" for i in range(5)])[0]]) is None  # can never fit whole
    full_key = next(k for k in map(str, range(100)) if partition_of(k, 2) == 0)
    open_key = next(k for k in map(str, range(100)) if partition_of(k, 2) == 1)
    assert intake.need([part(["k"], keys=full_key)[0]]) == (0, {0: 1})  # its partition is full
    assert intake.need([part(["k"], keys=open_key)[0]]) is None  # one slot left there
