"""Parked PUTs on their own: released when they fit or their wait is over, oldest first."""

from __future__ import annotations

from zmqlab.intake import Need
from zmqlab.parking import ParkedPut, Parking


def parked(name: str, deadline: float, keyless: int) -> ParkedPut:
    return ParkedPut([name.encode()], [], deadline, (keyless, {}))


def test_each_put_is_judged_after_the_ones_before_it_took_their_room():
    parking = Parking()
    for name in ("first", "second", "third"):
        parking.park(parked(name, deadline=10.0, keyless=2))
    room = [3]  # enough for one PUT of two records, not two
    answered: list[bytes] = []

    def answer(put: ParkedPut) -> None:
        answered.append(put.route[0])
        room[0] -= put.need[0]

    def fits(need: Need) -> bool:
        return need[0] <= room[0]

    parking.release(1.0, fits, answer)
    assert answered == [b"first"] and len(parking) == 2
    room[0] = 10
    parking.release(2.0, fits, answer)
    assert answered == [b"first", b"second", b"third"] and not parking


def test_a_put_that_fits_overtakes_an_older_one_that_does_not():
    parking = Parking()
    parking.park(parked("big", deadline=10.0, keyless=5))
    parking.park(parked("small", deadline=10.0, keyless=1))
    answered: list[bytes] = []
    parking.release(1.0, lambda need: need[0] <= 1, lambda put: answered.append(put.route[0]))
    assert answered == [b"small"] and [p.route[0] for p in parking] == [b"big"]


def test_a_put_whose_wait_is_over_is_answered_whether_it_fits_or_not():
    parking = Parking()
    parking.park(parked("due", deadline=1.0, keyless=5))
    parking.park(parked("later", deadline=9.0, keyless=5))
    assert parking.next_deadline == 1.0
    answered: list[bytes] = []
    parking.release(1.0, lambda need: False, lambda put: answered.append(put.route[0]))
    assert answered == [b"due"] and parking.next_deadline == 9.0


def test_when_nobody_may_wait_every_put_is_answered_and_the_limit_is_a_count():
    parking = Parking(limit=2)
    parking.park(parked("a", 9.0, 1))
    assert not parking.full
    parking.park(parked("b", 9.0, 1))
    assert parking.full
    answered: list[bytes] = []
    parking.release(1.0, lambda need: False, lambda put: answered.append(put.route[0]),
                    may_wait=False)
    assert answered == [b"a", b"b"] and not parking and parking.next_deadline is None
