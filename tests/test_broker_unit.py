"""The broker's handlers and timers driven directly, with fake time and no sockets."""

from __future__ import annotations

import json

import pytest
from helpers import (
    ack,
    columns,
    consumer_says,
    full_broker_with_a_consumer,
    hello,
    only_batch,
    placed,
    producer_says,
    put,
    put_parked,
    records_of,
    replies_to,
    to,
)

from zmqlab import protocol as proto
from zmqlab.errors import ConfigError, ProtocolError
from zmqlab.producer import encode_put, make_record
from zmqlab.protocol import Command


def test_put_before_hello_is_refused_as_retryable(make_broker):
    broker, _ = make_broker()
    reply = put(broker, b"{}")
    assert proto.error_of(reply) == ("NOT_REGISTERED", "say HELLO before sending records", True)


def test_broker_refuses_records_until_the_expected_nodes_registered(make_broker):
    broker, _ = make_broker(expect_producers=2, expect_consumers=1)
    hello(broker)
    code, reason, retryable = proto.error_of(put(broker, b"{}"))
    assert (code, retryable) == ("NOT_READY", True)
    assert "1 more producer(s) and 1 more consumer(s)" in reason
    hello(broker, b"req-2", "8081")
    consumer_says(broker, "9090", Command.HELLO)
    assert put(broker, b"{}").command is Command.ACK


def test_put_acks_runs_and_a_keyless_batch_sticks_to_one_partition(make_broker):
    broker, _ = make_broker(partitions=3)
    hello(broker)
    reply = put(broker, b'{"a":1}', b'{"a":2}', b'{"a":3}')
    assert reply.header == {"acks": [[0, 3, 0, 0]], "dups": [], "errors": []}
    assert put(broker, b'{"a":4}', b'{"a":5}').header["acks"] == [[0, 2, 1, 0]]
    assert put(broker, b'{"a":6}').header["acks"] == [[0, 1, 2, 0]]
    assert put(broker, b'{"a":7}').header["acks"] == [[0, 1, 0, 3]]  # round robin by batch


def test_keyed_records_go_to_crc32_of_the_key(make_broker):
    import zlib

    broker, _ = make_broker(partitions=6)
    hello(broker)
    reply = put(broker, b"{}", b"{}", key="customer-42")
    expected = zlib.crc32(b"customer-42") % 6
    assert [a[1] for a in placed(reply)] == [expected, expected]
    assert [a[2] for a in placed(reply)] == [0, 1]


def test_retry_with_the_same_id_is_answered_as_duplicate_not_queued_twice(make_broker):
    broker, _ = make_broker()
    hello(broker)
    first = placed(put(broker, b'{"x":1}', ids=["abc"]))[0]
    again = placed(put(broker, b'{"x":1}', ids=["abc"]))[0]
    assert again == [0, first[1], first[2], True]
    assert sum(p.depth for p in broker.partitions) == 1


def test_full_partitions_refuse_with_a_retryable_error_and_keep_everything(make_broker):
    broker, _ = make_broker(partitions=2, capacity=1)
    hello(broker)
    reply = put(broker, b"{}", b"{}", b"{}")
    assert [a[0] for a in placed(reply)] == [0, 1]
    (index, code, _reason, retryable), = reply.header["errors"]
    assert (index, code, retryable) == (2, "PARTITION_FULL", True)
    assert [p.depth for p in broker.partitions] == [1, 1]


@pytest.mark.parametrize("meta, payload, code", [
    (["", None, 1], b"{}", "INVALID_RECORD"),
    (["a", 5, 1], b"{}", "INVALID_RECORD"),
    (["a", None, "yesterday"], b"{}", "INVALID_RECORD"),
    (["a", None, 1.5], b"{}", "INVALID_RECORD"),  # created_us is whole microseconds
    # a time no datetime can hold would fail the consumer's INSERT on every try
    (["a", None, 2**62], b"{}", "INVALID_RECORD"),
    (["a", None, -1], b"{}", "INVALID_RECORD"),
    (["a", None, 1], b"[]", "INVALID_RECORD"),
    (["a", None, 1], b'{"a":1} x', "INVALID_RECORD"),
    (["a", None, 1], b'{"\xc3\xa9":1', "INVALID_RECORD"),
    # what a SQL database would refuse after the producer was told "stored": refused here
    (["a", None, 1], b'{"a":NaN}', "INVALID_RECORD"),
    (["a", None, 1], b'{"a":1e999}', "INVALID_RECORD"),  # Infinity
    (["a", None, 1], b'{"a":"\\ud800"}', "INVALID_RECORD"),  # a lone surrogate
    (["a", None, 1], b'{"a":"\xff"}', "INVALID_RECORD"),  # not UTF-8
    (["a", None, 1], b'\xef\xbb\xbf{"a":1}', "INVALID_RECORD"),  # a byte-order mark
    (["a", None, 1], b"x" * 2_000_000, "TOO_LARGE"),
])
def test_bad_records_get_a_clear_refusal(meta, payload, code, make_broker):
    broker, _ = make_broker()
    hello(broker)
    reply = producer_says(broker, Command.PUT, columns([[*meta, len(payload)]]), [payload])
    assert reply.header["errors"][0][1] == code
    assert reply.header["errors"][0][3] is False
    assert sum(p.depth for p in broker.partitions) == 0


@pytest.mark.parametrize("header, frames", [
    ({"ids": ["a"], "created_us": 1}, [b"{}"]),  # no sizes
    ({"ids": ["a"], "sizes": [2]}, [b"{}"]),  # no times
    ({"ids": ["a"], "created_us": 1, "sizes": [3]}, [b"{}"]),  # sizes do not match the frame
    ({"ids": ["a"], "created_us": 1, "sizes": 3}, [b"{}"]),  # nor as one shared value
    ({"ids": ["a"], "created_us": 1, "sizes": [2]}, [b"{}", b"{}"]),  # one frame per batch
    ({"ids": ["a"], "created_us": 1, "sizes": [-1]}, [b"{}"]),
    ({"ids": ["a", "b"], "created_us": 1, "sizes": [2]}, [b"{}{}"]),  # a short column
    ({"ids": ["a"], "created_us": 1, "sizes": {"a": 2}}, [b"{}"]),  # neither list nor value
    ({"ids": "nope", "created_us": 1, "sizes": 2}, [b"{}"]),
])
def test_put_whose_sizes_and_frames_disagree_is_refused_whole(header, frames, make_broker):
    broker, _ = make_broker()
    hello(broker)
    reply = producer_says(broker, Command.PUT, header, frames)
    assert proto.error_of(reply)[0] == "BAD_MESSAGE"
    assert sum(p.depth for p in broker.partitions) == 0


@pytest.mark.parametrize("frames, code", [
    ([b"ZQL9", b"PUT", b"{}"], "BAD_VERSION"),
    ([proto.VERSION, b"JUMP", b"{}"], "UNKNOWN_COMMAND"),
    ([proto.VERSION, b"PUT", b"{nope"], "BAD_MESSAGE"),
    ([proto.VERSION, b"PUT"], "BAD_MESSAGE"),
    ([proto.VERSION, b"RECORDS", b"{}"], "UNKNOWN_COMMAND"),
])
def test_malformed_messages_get_err_and_the_broker_carries_on(frames, code, make_broker):
    broker, _ = make_broker()
    broker.handle_frontend([b"req-1", b"", *frames], broker.clock())
    (_, reply), = broker.outbox
    assert proto.error_of(proto.decode(reply[2:]))[0] == code


def test_consumers_get_round_robin_assignments_and_records_within_credit(make_broker):
    broker, _ = make_broker(partitions=4, max_batch=2)
    hello(broker)
    for name in ("9091", "9090", "9092"):
        consumer_says(broker, name, Command.HELLO)
    assert [p.owner for p in broker.partitions] == ["9090", "9091", "9092", "9090"]
    to(broker, "9090")
    for _ in range(5):
        put(broker, b"{}", key="k")  # every record into the same partition
    number = next(p.number for p in broker.partitions if p.depth)
    owner = broker.partitions[number].owner
    assert to(broker, owner) == []  # no credit yet
    sent = consumer_says(broker, owner, Command.FETCH, {"credit": 3})
    assert [m.command for m in sent] == [Command.RECORDS, Command.RECORDS]
    assert [len(records_of(m)) for m in sent] == [2, 1]  # max_batch 2, credit 3
    assert broker.partitions[number].inflight == 3
    acked = consumer_says(broker, owner, Command.ACK,
                          ack(number, only_batch(sent[0])["epoch"], [0, 1]))
    assert [len(records_of(m)) for m in acked] == [2]  # freed credit brings the rest


def test_a_silent_consumer_expires_and_its_records_go_to_the_survivor_first(make_broker):
    broker, clock = make_broker(partitions=1)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    put(broker, b'{"n":1}', b'{"n":2}')
    first = to(broker, "9090")
    assert len(records_of(first[0])) == 2
    assert first[0].payloads == (b'{"n":1}{"n":2}',)
    consumer_says(broker, "9091", Command.HELLO)
    consumer_says(broker, "9091", Command.FETCH, {"credit": 10})
    assert broker.partitions[0].owner == "9090"  # round robin keeps Q1 on 9090

    clock.now += 1.0
    consumer_says(broker, "9091", Command.HEARTBEAT)
    clock.now += 2.5  # 9090 silent for 3.5 s > 3 x 1 s
    broker.tick(clock.now)
    assert "9090" not in broker.consumers
    records = [m for m in to(broker, "9091") if m.command is Command.RECORDS]
    assert [r[5] for r in records_of(records[0])] == [2, 2]  # attempt raised
    assert only_batch(records[0])["epoch"] == only_batch(first[0])["epoch"] + 1
    late = consumer_says(broker, "9090", Command.ACK, ack(0, 1, [0, 1]))
    assert proto.error_of(late[0])[0] == "NOT_REGISTERED"
    assert broker.partitions[0].depth == 2


def test_heartbeats_keep_a_consumer_alive_and_are_sent_to_it(make_broker):
    broker, clock = make_broker()
    consumer_says(broker, "9090", Command.HELLO)
    for _ in range(10):
        clock.now += 1.0
        consumer_says(broker, "9090", Command.HEARTBEAT)
        broker.tick(clock.now)
    assert "9090" in broker.consumers
    assert any(m.command is Command.HEARTBEAT for m in to(broker, "9090"))


def test_a_joining_consumer_gets_a_partition_only_after_the_old_owner_acks(make_broker):
    broker, _ = make_broker(partitions=2)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    put(broker, b"{}")  # one record in each partition
    put(broker, b"{}")
    held = to(broker, "9090")
    batches = [b for m in held if m.command is Command.RECORDS for b in m.header["batches"]]
    assert sorted(b["partition"] for b in batches) == [0, 1]
    assert len([m for m in held if m.command is Command.RECORDS]) == 1  # one message for both
    consumer_says(broker, "9091", Command.HELLO)
    consumer_says(broker, "9091", Command.FETCH, {"credit": 10})
    assert broker.partitions[1].owner == "9090" and broker.partitions[1].target == "9091"
    put(broker, b"{}", b"{}")
    put(broker, b"{}")
    assert [m.command for m in to(broker, "9091")] == []  # Q2 still draining at 9090
    q2 = next(b for b in batches if b["partition"] == 1)
    consumer_says(broker, "9090", Command.ACK, ack(1, q2["epoch"], [0]))
    got = [only_batch(m) for m in to(broker, "9091") if m.command is Command.RECORDS]
    assert [(b["partition"], b["epoch"]) for b in got] == [(1, q2["epoch"] + 1)]


def test_ack_errors_are_reported_to_the_consumer(make_broker):
    broker, _ = make_broker(partitions=1)
    consumer_says(broker, "9090", Command.HELLO)
    replies = consumer_says(broker, "9090", Command.ACK, ack(0, 99, [0]))
    assert proto.error_of(replies[-1])[0] == "STALE_EPOCH"
    assert replies[-1].header["partition"] == 0
    replies = consumer_says(broker, "9090", Command.ACK, ack(5, 1, [0]))
    assert proto.error_of(replies[-1])[0] == "BAD_MESSAGE"
    replies = consumer_says(broker, "9090", Command.ACK, {"acks": "all"})
    assert proto.error_of(replies[-1])[0] == "BAD_MESSAGE"


def test_one_refused_ack_entry_does_not_stop_the_others(make_broker):
    broker, _ = make_broker(partitions=2)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    put(broker, b"{}")
    put(broker, b"{}")
    (message,) = to(broker, "9090")[-1:]
    epochs = {b["partition"]: b["epoch"] for b in message.header["batches"]}
    replies = consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": epochs[0] + 7, "offsets": [[0, 1]]},
        {"partition": 1, "epoch": epochs[1], "offsets": [[0, 1]]}]})
    assert [proto.error_of(r)[0] for r in replies] == ["STALE_EPOCH"]
    assert [p.depth for p in broker.partitions] == [1, 0]


def test_bye_releases_and_rebalances(make_broker):
    broker, _ = make_broker(partitions=2)
    hello(broker)
    for name in ("9090", "9091"):
        consumer_says(broker, name, Command.HELLO)
        consumer_says(broker, name, Command.FETCH, {"credit": 5})
    put(broker, b"{}")
    put(broker, b"{}")
    to(broker, "9091")
    consumer_says(broker, "9091", Command.BYE)
    assert [p.owner for p in broker.partitions] == ["9090", "9090"]
    assert broker.partitions[1].released_total == 1


def test_stats_are_answered_without_registration(make_broker):
    broker, _ = make_broker(partitions=2)
    snap = producer_says(broker, Command.STATS).header
    assert [p["partition"] for p in snap["partitions"]] == [0, 1]
    assert snap["ready"] is True


def test_each_part_of_a_put_is_answered_on_its_own_and_a_bad_part_spoils_only_itself(make_broker):
    broker, _ = make_broker(partitions=2)
    hello(broker)
    good = [proto.dump({"ids": ["a", "b"], "created_us": 1, "sizes": 2}), b"{}{}"]
    bad = [b"not json", b""]
    other = [proto.dump({"ids": ["c"], "keys": ["k"], "created_us": [1], "sizes": [2]}), b"{}"]
    broker.outbox.clear()
    broker.handle_frontend([b"req-1", b"", *proto.encode_parts(Command.PUT, good + bad + other)],
                           broker.clock())
    (_side, frames), = broker.outbox
    assert frames[2:4] == [proto.VERSION, Command.ACK.value]
    first, second, third = (proto.parse_header(f) for f in frames[4:])
    assert first == {"acks": [[0, 2, 0, 0]], "dups": [], "errors": []}
    assert (second["code"], second["retryable"]) == ("BAD_MESSAGE", False)
    assert [a[1] for a in third["acks"]] == [1] and third["errors"] == []
    assert sum(p.depth for p in broker.partitions) == 3


def test_a_put_with_an_unpaired_frame_is_refused_whole(make_broker):
    broker, _ = make_broker()
    hello(broker)
    reply = producer_says(broker, Command.PUT, {"ids": [], "created_us": 1, "sizes": 0},
                          [b"", b"{}"])
    assert proto.error_of(reply)[0] == "BAD_MESSAGE"


def test_an_id_twice_in_one_batch_is_stored_once_and_answered_as_a_duplicate(make_broker):
    broker, _ = make_broker(partitions=1)
    hello(broker)
    reply = put(broker, b'{"n":1}', b'{"n":2}', b'{"n":1}', ids=["x", "y", "x"])
    assert placed(reply) == [[0, 0, 0, False], [1, 0, 1, False], [2, 0, 0, True]]
    assert broker.partitions[0].depth == 2


def test_a_keyless_batch_overflows_into_the_next_partition_before_anything_is_refused(make_broker):
    broker, _ = make_broker(partitions=3, capacity=2)
    hello(broker)
    reply = put(broker, *[b"{}"] * 7)
    assert reply.header["acks"] == [[0, 2, 0, 0], [2, 2, 1, 0], [4, 2, 2, 0]]
    assert [e[:2] for e in reply.header["errors"]] == [[6, "PARTITION_FULL"]]
    assert [p.depth for p in broker.partitions] == [2, 2, 2]


def test_a_bad_record_among_good_ones_is_refused_alone_and_the_rest_stored_in_runs(make_broker):
    broker, _ = make_broker(partitions=2)
    hello(broker)
    reply = put(broker, b'{"a":1}', b'{"a":', b'{"a":3}', b'{"a":4}')
    assert reply.header["acks"] == [[0, 1, 0, 0], [2, 2, 0, 1]]
    assert [e[:2] for e in reply.header["errors"]] == [[1, "INVALID_RECORD"]]
    assert broker.partitions[0].depth == 3


def test_compact_sends_a_value_shared_by_every_record_once_and_column_expands_it():
    assert proto.compact([7, 7, 7]) == 7
    assert proto.compact([None, None]) is None
    assert proto.compact([1, 2, 1]) == [1, 2, 1]
    assert proto.compact([]) == []
    assert proto.column({"sizes": 5}, "sizes", 3) == [5, 5, 5]
    assert proto.column({"keys": ["a", None]}, "keys", 2) == ["a", None]
    assert proto.column({}, "keys", 2, optional=True) == [None, None]
    for header, why in (({}, "missing"), ({"sizes": [1]}, "1 values for 2"),
                        ({"sizes": {"all": 1}}, "a list or one value")):
        with pytest.raises(ProtocolError, match=why):
            proto.column(header, "sizes", 2)


def test_a_put_with_shared_values_reaches_the_consumer_with_every_value_in_place(make_broker):
    import zlib

    broker, _ = make_broker(partitions=4)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    header = {"ids": ["a", "b", "c"], "keys": "k", "created_us": 42, "sizes": 2}
    reply = producer_says(broker, Command.PUT, header, [b"{}" * 3])
    number = zlib.crc32(b"k") % 4
    assert reply.header["acks"] == [[0, 3, number, 0]]
    sent = consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    (records,) = [m for m in sent if m.command is Command.RECORDS]
    (batch,) = records.header["batches"]
    assert batch["keys"] == "k" and batch["created_us"] == 42 and batch["attempts"] == 1
    assert records_of(records) == [[o, i, "k", "8080", 42, 1, 2]
                                   for o, i in enumerate(["a", "b", "c"])]


def test_encode_put_sends_a_shared_time_key_and_size_once():
    from zmqlab.producer import OutRecord, encode_put

    same = proto.decode(encode_put([OutRecord(b"{}", f"r{i}", None, 1.5) for i in range(3)]))
    assert same.header == {"ids": ["r0", "r1", "r2"], "keys": None, "created_us": 1_500_000,
                           "sizes": 2}
    mixed = proto.decode(encode_put([OutRecord(b"{}", "a", "k", 1.0),
                                     OutRecord(b'{"x":1}', "b", None, 2.0)]))
    assert mixed.header == {"ids": ["a", "b"], "keys": ["k", None],
                            "created_us": [1_000_000, 2_000_000], "sizes": [2, 7]}


@pytest.mark.parametrize("record, text", [
    (lambda: make_record({"a": float("nan")}), "payload is not JSON"),
    (lambda: make_record({"a": "\ud800"}), "payload is not JSON"),
    (lambda: make_record({"a": object()}), "payload is not JSON"),
    (lambda: encode_put([make_record({}, id="\ud800")]), "without lone surrogates"),
    (lambda: encode_put([make_record({}, key="\udfff")]), "without lone surrogates"),
])
def test_what_the_broker_would_refuse_fails_in_the_client_before_sending(record, text):
    with pytest.raises(ConfigError, match=text):
        record()


def test_a_put_that_does_not_fit_waits_for_room_and_is_stored_once_the_consumer_acks(make_broker):
    broker, clock, held = full_broker_with_a_consumer(make_broker)
    put_parked(broker, b'{"n":3}')
    put_parked(broker, b'{"n":4}', who=b"req-2")
    assert broker.snapshot()["waiting_puts"] == 2 and broker.counters["refused"] == 0
    clock.now += 0.2
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [0]))
    broker.unpark(clock.now)
    (first,) = replies_to(broker, b"req-1")
    assert first.header == {"acks": [[0, 1, 0, 2]], "dups": [], "errors": []}
    assert replies_to(broker, b"req-2") == []  # still no room for the second: it waits on
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [1]))
    broker.unpark(clock.now)
    assert replies_to(broker, b"req-2")[0].header["acks"] == [[0, 1, 0, 3]]
    assert broker.snapshot()["waiting_puts"] == 0


def test_a_parked_put_is_refused_retryably_when_its_wait_is_over(make_broker):
    broker, clock, _ = full_broker_with_a_consumer(make_broker, put_wait_ms=300)
    put_parked(broker, b"{}")
    clock.now += 0.29
    broker.unpark(clock.now)
    assert replies_to(broker, b"req-1") == []
    clock.now += 0.02
    broker.unpark(clock.now)
    (reply,) = replies_to(broker, b"req-1")
    assert [(e[1], e[3]) for e in reply.header["errors"]] == [("PARTITION_FULL", True)]


def test_a_put_that_fits_goes_ahead_of_a_parked_one_that_does_not(make_broker):
    broker, clock, held = full_broker_with_a_consumer(make_broker)
    put_parked(broker, b"{}", b"{}")  # needs both slots
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [0]))
    broker.unpark(clock.now)
    assert replies_to(broker, b"req-1") == []  # one slot is not enough for it
    assert put(broker, b"{}", who=b"req-2").header["acks"] == [[0, 1, 0, 2]]  # this one fits
    clock.now += 0.6
    broker.unpark(clock.now)  # its wait is over: what fits (nothing) stored, the rest refused
    (reply,) = replies_to(broker, b"req-1")
    assert [e[1] for e in reply.header["errors"]] == ["PARTITION_FULL", "PARTITION_FULL"]


def test_a_resend_of_records_the_broker_holds_needs_no_room_and_does_not_wait(make_broker):
    broker, _, held = full_broker_with_a_consumer(make_broker)
    ids = [f"id-{i}-0" for i in range(2)]  # what full_broker_with_a_consumer put
    reply = put(broker, b"{}", b"{}", ids=ids)
    assert [d[0] for d in reply.header["dups"]] == [0, 1] and broker.snapshot()["waiting_puts"] == 0


@pytest.mark.parametrize("keys", [None, ["k", "k", "k"]])
def test_only_ids_the_broker_does_not_know_need_room(keys, make_broker):
    broker, clock, held = full_broker_with_a_consumer(make_broker)
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [0]))  # room for one
    # held, recently acked, new: only the new one needs the slot, so nothing waits
    ids = ["id-1-0", "id-0-0", "new"]
    metas = [[i, k, 1_000_000, 2] for i, k in zip(ids, keys or [None] * 3, strict=True)]
    reply = producer_says(broker, Command.PUT, columns(metas), [b"{}" * 3])
    assert [d[0] for d in reply.header["dups"]] == [0, 1]
    assert [a[:2] for a in reply.header["acks"]] == [[2, 1]]
    assert broker.snapshot()["waiting_puts"] == 0


def test_an_id_twice_in_one_part_needs_room_once(make_broker):
    broker, clock, held = full_broker_with_a_consumer(make_broker)
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [0]))  # room for one
    reply = put(broker, b"{}", b"{}", ids=["twice", "twice"])
    assert reply.header["acks"] == [[0, 1, 0, 2]] and [d[0] for d in reply.header["dups"]] == [1]
    assert broker.snapshot()["waiting_puts"] == 0


def test_a_producer_waiting_on_a_parked_put_is_not_expired_for_its_silence(make_broker):
    broker, clock, held = full_broker_with_a_consumer(make_broker, put_wait_ms=5000)
    put_parked(broker, b"{}")
    clock.now += 3.5  # longer than 3 x 1 s of silence
    consumer_says(broker, "9090", Command.HEARTBEAT)
    broker.tick(clock.now)
    assert b"req-1" in broker.producers
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [0]))
    broker.unpark(clock.now)
    assert replies_to(broker, b"req-1")[0].header["acks"] == [[0, 1, 0, 2]]


def test_a_lone_surrogate_in_a_header_is_refused_at_once_and_parked_puts_are_unharmed(make_broker):
    broker, clock, held = full_broker_with_a_consumer(make_broker)
    put_parked(broker, b"{}")
    # The standard library writes the "\ud800" escape that no database driver takes.
    bad = json.dumps({"ids": ["ok", "\ud800"], "keys": None, "created_us": 1, "sizes": 2})
    broker.handle_frontend([b"req-2", b"", proto.VERSION, Command.PUT.value, bad.encode(),
                            b"{}{}"], clock.now)
    (reply,) = replies_to(broker, b"req-2")  # at once, not parked behind the full queue
    assert proto.error_of(reply)[0] == "BAD_MESSAGE"
    assert "header is not JSON" in reply.header["reason"]
    consumer_says(broker, "9090", Command.ACK, ack(0, held["epoch"], [0]))
    broker.unpark(clock.now)
    assert replies_to(broker, b"req-1")[0].header["acks"] == [[0, 1, 0, 2]]


def test_parked_puts_are_told_the_broker_is_stopping(make_broker):
    broker, clock, _ = full_broker_with_a_consumer(make_broker)
    put_parked(broker, b"{}")
    broker.stopping_until = clock.now + 10
    broker.unpark(clock.now)
    (reply,) = replies_to(broker, b"req-1")
    assert proto.error_of(reply)[0] == "UNAVAILABLE"


def test_without_a_wait_or_a_consumer_a_full_broker_refuses_at_once(make_broker):
    broker, _, _ = full_broker_with_a_consumer(make_broker, put_wait_ms=0)
    assert put(broker, b"{}").header["errors"][0][1] == "PARTITION_FULL"
    lonely, _ = make_broker(partitions=1, capacity=1)
    hello(lonely)
    put(lonely, b"{}")
    assert put(lonely, b"{}").header["errors"][0][1] == "PARTITION_FULL"  # nobody makes room


def test_a_put_larger_than_the_whole_queue_stores_what_fits_without_waiting(make_broker):
    broker, clock = make_broker(partitions=1, capacity=2)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    reply = put(broker, b"{}", b"{}", b"{}")
    assert reply.header["acks"] == [[0, 2, 0, 0]]
    assert [e[1] for e in reply.header["errors"]] == ["PARTITION_FULL"]


def test_a_busy_consumer_gets_full_batches_and_the_rest_once_it_acked(make_broker):
    broker, _ = make_broker(partitions=1, max_batch=3)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 100})
    put(broker, b"{}")
    (first,) = to(broker, "9090")  # nothing in flight: sent at once
    assert len(records_of(first)) == 1
    put(broker, b"{}", b"{}")
    assert to(broker, "9090") == []  # it is storing one: two more wait for a full batch
    put(broker, b"{}", b"{}")
    (full,) = to(broker, "9090")
    assert len(records_of(full)) == 3
    assert broker.partitions[0].pending == 1
    consumer_says(broker, "9090", Command.ACK, ack(0, only_batch(first)["epoch"], [0]))
    assert to(broker, "9090") == []  # three still in flight
    (rest,) = consumer_says(broker, "9090", Command.ACK,
                            ack(0, only_batch(full)["epoch"], [1, 2, 3]))
    assert len(records_of(rest)) == 1


def test_a_keyed_put_waits_for_room_in_its_own_partition_even_if_others_have_some(make_broker):
    import zlib

    broker, clock = make_broker(partitions=2, capacity=1)
    hello(broker)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 10})
    number = zlib.crc32(b"k") % 2
    put(broker, b"{}", key="k")  # fills the key's partition; the other one stays empty
    (held,) = to(broker, "9090")
    metas = [["second", "k", 1_000_000, 2]]
    broker.handle_frontend([b"req-1", b"", *proto.encode(Command.PUT, columns(metas), [b"{}"])],
                           clock.now)
    assert replies_to(broker, b"req-1") == [] and broker.partitions[1 - number].depth == 0
    consumer_says(broker, "9090", Command.ACK, ack(number, only_batch(held)["epoch"], [0]))
    broker.unpark(clock.now)
    (reply,) = replies_to(broker, b"req-1")
    assert reply.header["acks"] == [[0, 1, number, 1]]
