"""The ring buffer and ownership rules, without sockets."""

from __future__ import annotations

import random

import pytest

from zmqlab.errors import ReplyError
from zmqlab.partition import Partition, Taken


def runs(offsets: list[int]) -> list[list[int]]:
    """Offsets as the wire's runs, one per offset (an ACK may name them in any order)."""
    return [[offset, 1] for offset in offsets]


def entry(n: int) -> tuple[str, None, str, int, bytes]:
    return (f"id{n}", None, "8080", 1_700_000_000_000_000 + n, b'{"n":%d}' % n)


def offsets_of(taken: Taken) -> list[int]:
    return [o for first, count in taken.offsets for o in range(first, first + count)]


def rows(taken: Taken) -> list[tuple[int, str, int]]:
    """(offset, id, attempt) of each record handed out, checking the columns line up."""
    columns = (taken.ids, taken.keys, taken.producers, taken.created_us, taken.attempts,
               taken.payloads)
    assert all(len(c) == len(taken.ids) for c in columns)
    return list(zip(offsets_of(taken), taken.ids, taken.attempts, strict=True))


def owned(capacity: int = 4, owner: str = "9090") -> Partition:
    p = Partition(0, capacity)
    assert p.want_owner(owner)
    return p


def test_full_ring_refuses_and_never_overwrites():
    p = owned(capacity=3)
    assert [p.append(*entry(i)) for i in range(3)] == [0, 1, 2]
    assert p.append(*entry(3)) is None
    assert p.take(10).ids == ["id0", "id1", "id2"]
    assert p.append(*entry(3)) is None  # in-flight records still occupy the ring


def test_ack_removes_and_frees_space():
    p = owned(capacity=2)
    p.append(*entry(0))
    p.append(*entry(1))
    p.take(2)
    removed = p.ack("9090", p.epoch, runs([0]))
    assert removed[:2] == (0, ["id0"])
    assert (p.depth, p.inflight) == (1, 1)
    assert p.append(*entry(2)) == 2  # offsets only grow; slot reused


def test_out_of_order_ack_removes_once_the_head_is_acknowledged():
    p = owned()
    for i in range(3):
        p.append(*entry(i))
    p.take(3)
    assert p.ack("9090", p.epoch, runs([1, 2]))[:2] == (0, [])
    assert p.depth == 3
    assert p.ack("9090", p.epoch, runs([0]))[:2] == (0, ["id0", "id1", "id2"])


@pytest.mark.parametrize("who, epoch_delta, offsets, code", [
    ("9091", 0, [0], "NOT_OWNER"),
    ("9090", -1, [0], "STALE_EPOCH"),
    ("9090", 0, [1], "UNKNOWN_OFFSET"),  # not delivered yet
    ("9090", 0, [7], "UNKNOWN_OFFSET"),
])
def test_bad_acks_are_refused_and_change_nothing(who, epoch_delta, offsets, code):
    p = owned()
    p.append(*entry(0))
    p.append(*entry(1))
    p.take(1)
    before = p.snapshot()
    with pytest.raises(ReplyError) as caught:
        p.ack(who, p.epoch + epoch_delta, runs(offsets))
    assert caught.value.code == code
    assert p.snapshot() == before


def test_double_ack_is_refused():
    p = owned()
    p.append(*entry(0))
    p.append(*entry(1))
    p.take(2)
    p.ack("9090", p.epoch, runs([1]))
    with pytest.raises(ReplyError):
        p.ack("9090", p.epoch, runs([1]))


def test_release_redelivers_first_in_order_with_attempt_raised():
    p = owned()
    for i in range(3):
        p.append(*entry(i))
    p.take(2)
    p.want_owner("9091")
    assert p.owner == "9090"  # still handing over: two records in flight at 9090
    assert p.owner_gone() == 2
    assert (p.owner, p.epoch) == ("9091", 2)
    assert rows(p.take(10)) == [(0, "id0", 2), (1, "id1", 2), (2, "id2", 1)]


def test_handover_waits_for_the_old_owners_acks():
    p = owned()
    p.append(*entry(0))
    p.take(1)
    assert not p.want_owner("9091")
    assert p.handing_over and p.owner == "9090" and p.epoch == 1
    p.ack("9090", 1, runs([0]))  # the old owner finishes: the lease moves now
    assert (p.owner, p.epoch, p.handing_over) == ("9091", 2, False)
    with pytest.raises(ReplyError):
        p.ack("9090", 1, runs([0]))


def test_stale_ack_after_a_release_settles_nothing():
    p = owned()
    p.append(*entry(0))
    p.take(1)
    p.want_owner("9091")
    p.owner_gone()
    p.take(1)  # redelivered to 9091 at epoch 2
    with pytest.raises(ReplyError):
        p.ack("9090", 1, runs([0]))
    assert p.depth == 1
    p.ack("9091", 2, runs([0]))
    assert p.depth == 0


def test_random_rebalances_never_put_a_record_in_flight_at_two_owners():
    rng = random.Random(7)
    p = Partition(0, 50)
    at: dict[int, str] = {}  # offset -> who holds it in flight
    consumers = ["9090", "9091", "9092", None]
    n = 0
    for _ in range(3000):
        action = rng.random()
        if action < 0.3:
            if p.append(*entry(n)) is not None:
                n += 1
        elif action < 0.5 and p.owner and not p.handing_over:
            for offset in offsets_of(p.take(rng.randint(1, 5))):
                assert offset not in at, "delivered while in flight elsewhere"
                at[offset] = p.owner
        elif action < 0.7 and at:
            holder = at[min(at)]
            if holder == p.owner:
                offsets = sorted(o for o, h in at.items() if h == holder)[: rng.randint(1, 3)]
                p.ack(holder, p.epoch, runs(offsets))
                for o in offsets:
                    del at[o]
        elif action < 0.85:
            p.want_owner(rng.choice(consumers))
            if not at:
                assert not p.handing_over
        else:
            if p.owner is not None:
                p.owner_gone()
                at.clear()
        assert all(h == p.owner for h in at.values())
        assert p.head <= p.cursor <= p.tail and p.tail - p.head <= p.capacity


def test_find_locates_a_held_record_across_the_wrap():
    p = owned(capacity=3)
    for i in range(3):
        p.append(*entry(i))
    p.take(2)
    p.ack("9090", p.epoch, runs([0, 1]))
    p.append(*entry(3))  # wraps into slot 0
    assert (p.find("id3"), p.find("id2"), p.find("id0")) == (3, 2, None)


def test_ack_refuses_a_repeated_offset():
    p = owned()
    for i in range(3):
        p.append(*entry(i))
    p.take(3)
    with pytest.raises(ReplyError):
        p.ack("9090", p.epoch, runs([1, 1]))
    assert p.depth == 3


def test_runs_are_stored_and_handed_out_across_the_wrap():
    p = owned(capacity=5)
    assert p.extend(["a", "b", "c"], [None, "k", None], "8080", [1, 2, 3],
                    [b"{}", b'{"b":1}', b"{}"]) == (0, 3)
    taken = p.take(2)
    assert (taken.offsets, taken.keys, taken.created_us) == ([[0, 2]], [None, "k"], [1, 2])
    p.ack("9090", p.epoch, runs([0, 1]))
    records = [entry(n) for n in range(3, 8)]
    first, stored = p.extend([r[0] for r in records], [r[1] for r in records], "8081",
                             [r[3] for r in records], [r[4] for r in records])
    assert (first, stored) == (3, 4)  # room for four: the fifth is left to the caller
    taken = p.take(10)
    assert rows(taken) == [(2, "c", 1), (3, "id3", 1), (4, "id4", 1), (5, "id5", 1),
                           (6, "id6", 1)]
    assert taken.producers == ["8080", "8081", "8081", "8081", "8081"]
    assert taken.payloads[-1] == b'{"n":6}'
    settled = p.ack("9090", p.epoch, runs([2, 3, 4, 5, 6]))
    assert (settled.first, settled.ids) == (2, ["c", "id3", "id4", "id5", "id6"])
    assert (p.depth, p.find("id3")) == (0, None)


def test_a_redelivery_skips_records_acknowledged_out_of_order():
    p = owned()
    for i in range(4):
        p.append(*entry(i))
    p.take(4)
    p.ack("9090", p.epoch, runs([1, 3]))
    p.want_owner("9091")
    p.owner_gone()
    taken = p.take(10)
    assert taken.offsets == [[0, 1], [2, 1]]
    assert rows(taken) == [(0, "id0", 2), (2, "id2", 2)]
