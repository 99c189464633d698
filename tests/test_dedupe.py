"""The dedupe window on its own: held ids, acknowledged ids with their position, generations."""

from __future__ import annotations

from zmqlab.dedupe import DedupeWindow


def test_held_ids_are_known_until_acknowledged_then_remembered_with_their_position():
    window = DedupeWindow(100)
    window.hold(["a", "b", "c"])
    assert "a" in window and not window.all_new(["x", "b"]) and window.all_new(["x", "y"])
    assert window.acked_position("a") is None  # held, not acknowledged yet
    window.settle(partition=3, first=40, ids=["a", "b"])
    assert window.held == {"c"}
    assert window.acked_position("a") == (3, 40) and window.acked_position("b") == (3, 41)
    assert "a" in window and window.remembered == 2


def test_a_dead_letter_is_forgotten_so_replaying_its_id_is_not_a_retry():
    window = DedupeWindow(100)
    window.hold(["a", "b", "c"])
    window.settle(partition=0, first=7, ids=["a", "b", "c"], dead=[8])
    assert "b" not in window and window.acked_position("b") is None
    assert window.acked_position("c") == (0, 9)


def test_two_generations_bound_the_memory_and_forget_the_oldest_whole():
    window = DedupeWindow(2)
    for n in range(6):
        window.hold([f"id-{n}"])
        window.settle(partition=0, first=n, ids=[f"id-{n}"])
        assert window.remembered <= 2 * 2
    assert "id-5" in window and "id-4" in window
    assert "id-0" not in window and "id-1" not in window


def test_a_window_of_zero_remembers_no_acknowledged_id():
    window = DedupeWindow(0)
    window.hold(["a"])
    window.settle(partition=0, first=0, ids=["a"])
    assert "a" not in window and window.remembered == 0


def test_unknown_gives_the_distinct_new_ids_or_none_when_one_cannot_be_looked_up():
    window = DedupeWindow(10)
    window.hold(["held"])
    window.hold(["acked"])
    window.settle(partition=1, first=0, ids=["acked"])
    assert window.unknown(["new", "held", "acked", "new"]) == {"new"}
    assert window.unknown([["not", "hashable"]]) is None
