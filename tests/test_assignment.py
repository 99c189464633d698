from __future__ import annotations

import pytest

from zmqlab.assignment import format_table, round_robin
from zmqlab.errors import ConfigError

SEED = ["9090", "9091", "9092"]


def test_three_consumers_three_partitions():
    assert round_robin(3, SEED) == {0: "9090", 1: "9091", 2: "9092"}


def test_seed_four_partitions_q4_goes_to_consumer_1():
    assert round_robin(4, SEED)[3] == "9090"


def test_seed_six_partitions_q4_q5_q6():
    table = round_robin(6, SEED)
    assert [table[3], table[4], table[5]] == ["9090", "9091", "9092"]


def test_order_is_by_port_not_by_arrival_or_text():
    assert round_robin(3, ["10000", "9092", "9091"]) == {0: "9091", 1: "9092", 2: "10000"}


def test_more_consumers_than_partitions_leaves_extras_idle():
    assert round_robin(2, SEED) == {0: "9090", 1: "9091"}


def test_no_consumers_assigns_nothing():
    assert round_robin(4, []) == {}


@pytest.mark.parametrize("partitions, consumers", [(0, SEED), (3, ["9090", "9090"])])
def test_bad_input_is_a_clear_error(partitions, consumers):
    with pytest.raises(ConfigError):
        round_robin(partitions, consumers)


def test_table_in_the_seed_form():
    assert format_table(4, SEED)[3] == "Q4 -> consumer-1 (9090)"
    assert format_table(6, SEED)[3:] == ["Q4 -> consumer-1 (9090)", "Q5 -> consumer-2 (9091)",
                                         "Q6 -> consumer-3 (9092)"]


def test_no_partition_ever_has_two_owners_in_a_table():
    for p in range(1, 30):
        for c in range(1, 8):
            table = round_robin(p, [str(9090 + i) for i in range(c)])
            assert sorted(table) == list(range(p))
