"""The write-ahead log: what was acknowledged survives a restart; a torn tail never replays."""

from __future__ import annotations

import os
from typing import Any

import pytest
import zmq
from helpers import batch_rows, consumer_says, hello, only_batch, put, recv, to

import zmqlab.wal as wal_module
from zmqlab import protocol as proto
from zmqlab.broker import Broker
from zmqlab.config import BrokerConfig
from zmqlab.errors import ConfigError
from zmqlab.producer import encode_put, make_record
from zmqlab.protocol import Command
from zmqlab.wal import DiskFailure, read_segment


def durable(make_broker: Any, data_dir: Any, **options: Any) -> Any:
    broker, clock = make_broker(data_dir=str(data_dir), **options)
    hello(broker)
    return broker, clock


def restart(broker: Any, make_broker: Any, data_dir: Any, **options: Any) -> Any:
    """The broker process ends (its log closed as a kill would leave it: written, synced)."""
    broker._sync(broker.clock())
    broker.wal.close()
    return durable(make_broker, data_dir, **options)


def segments(data_dir: Any) -> list[str]:
    return sorted(n for n in os.listdir(data_dir) if n.endswith(".wal"))


def test_records_not_acknowledged_come_back_in_order_with_ids_offsets_and_attempts(
        make_broker, tmp_path):
    # Given a durable broker holding a, b, c; a was acknowledged, b and c released once
    broker, clock = durable(make_broker, tmp_path, partitions=1)
    put(broker, b'{"n":1}', b'{"n":2}', b'{"n":3}', ids=["a", "b", "c"])
    consumer_says(broker, "9090", Command.HELLO)
    (records,) = consumer_says(broker, "9090", Command.FETCH, {"credit": 10})[-1:]
    consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": only_batch(records)["epoch"], "offsets": [[0, 1]]}]})
    consumer_says(broker, "9090", Command.HELLO)  # it restarted: b and c released, attempt 2
    # When the broker restarts on its log
    broker, clock = restart(broker, make_broker, tmp_path, partitions=1)
    # Then b and c are back, at their offsets, with their attempts, ids known again
    assert broker.recovered == 2 and broker.partitions[0].head == 1
    consumer_says(broker, "9091", Command.HELLO)
    (again,) = consumer_says(broker, "9091", Command.FETCH, {"credit": 10})[-1:]
    rows = batch_rows(only_batch(again))
    assert [(r[0], r[1], r[5]) for r in rows] == [(1, "b", 2), (2, "c", 2)]
    assert again.payloads[0] == b'{"n":2}{"n":3}'
    retry = put(broker, b'{"n":2}', ids=["b"])
    assert retry.header["dups"] == [[0, 0, 1]] and retry.header["acks"] == []


def test_offsets_never_go_backwards_even_when_every_segment_was_deleted(make_broker, tmp_path):
    broker, clock = durable(make_broker, tmp_path, partitions=1, segment_bytes=4096)
    consumer_says(broker, "9090", Command.HELLO)
    consumer_says(broker, "9090", Command.FETCH, {"credit": 1000})
    for n in range(20):  # each PUT ~1 kB: several segments, all acknowledged
        put(broker, b'{"pad":"' + b"x" * 1000 + b'"}', ids=[f"id-{n}"])
        (records,) = to(broker, "9090")
        consumer_says(broker, "9090", Command.ACK, {"acks": [
            {"partition": 0, "epoch": only_batch(records)["epoch"],
             "offsets": only_batch(records)["offsets"]}]})
        broker.tick(clock())
    assert len(segments(tmp_path)) <= 2  # disk use follows the backlog, not the history
    broker, _ = restart(broker, make_broker, tmp_path, partitions=1, segment_bytes=4096)
    assert put(broker, b"{}", ids=["next"]).header["acks"] == [[0, 1, 0, 20]]


def test_a_torn_last_entry_is_cut_off_and_never_replayed(make_broker, tmp_path):
    broker, _ = durable(make_broker, tmp_path, partitions=1)
    put(broker, b"{}", ids=["kept"])
    put(broker, b"{}", ids=["torn"])
    broker._sync(broker.clock())
    broker.wal.close()
    (last,) = segments(tmp_path)
    path = tmp_path / last
    os.truncate(path, os.path.getsize(path) - 3)  # the power went during the last write
    broker, _ = durable(make_broker, tmp_path, partitions=1)
    assert broker.partitions[0].held_ids() == ["kept"]
    _, good, problem = read_segment(str(path))
    assert problem is None and good == os.path.getsize(path)  # cut off, not kept


def test_a_flipped_byte_ends_the_replay_there(make_broker, tmp_path):
    broker, _ = durable(make_broker, tmp_path, partitions=1)
    put(broker, b'{"a":1}', ids=["first"])
    size_after_first = os.path.getsize(tmp_path / segments(tmp_path)[0])
    put(broker, b'{"a":2}', ids=["second"])
    put(broker, b'{"a":3}', ids=["third"])
    broker._sync(broker.clock())
    broker.wal.close()
    path = tmp_path / segments(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[size_after_first + 20] ^= 0xFF  # inside the second entry
    path.write_bytes(bytes(data))
    broker, _ = durable(make_broker, tmp_path, partitions=1)
    assert broker.partitions[0].held_ids() == ["first"]


def test_a_full_disk_refuses_the_put_retryably_and_acknowledges_nothing(make_broker, tmp_path,
                                                                        monkeypatch):
    broker, _ = durable(make_broker, tmp_path, partitions=2)

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_module.os, "write", full)
    reply = put(broker, b"{}", b"{}", ids=["a", "b"])
    assert reply.header["acks"] == []
    assert {(e[1], e[3]) for e in reply.header["errors"]} == {("UNAVAILABLE", True)}
    assert all(p.depth == 0 for p in broker.partitions) and not broker.dedupe.held
    monkeypatch.undo()
    assert put(broker, b"{}", b"{}", ids=["a", "b"]).header["acks"] == [[0, 2, 1, 0]]


def test_a_failed_fsync_stops_the_broker_before_any_ack_goes_out(make_broker, tmp_path,
                                                                 monkeypatch):
    broker, clock = durable(make_broker, tmp_path, partitions=1)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_module.os, "fdatasync", failing)
    broker.handle_frontend([b"req-1", b"", *put_frames()], clock())
    with pytest.raises(DiskFailure, match="retried fsync"):
        broker._sync(clock())


def put_frames() -> list[bytes]:
    return encode_put([make_record({}, id="x")])


def test_a_running_broker_whose_fsync_fails_stops_and_never_acks(ctx, tmp_path, monkeypatch):
    # Given a durable broker running on its thread, and a registered producer
    config = BrokerConfig(frontend="inproc://wal-f", backend="inproc://wal-b",
                          data_dir=str(tmp_path))
    broker = Broker(config, context=ctx)
    broker.start()
    client = ctx.socket(zmq.REQ)
    client.setsockopt(zmq.LINGER, 0)
    try:
        client.connect(config.frontend)
        client.send_multipart(proto.encode_hello_producer("8080"))
        assert proto.decode(recv(client)).command is Command.WELCOME
        # When the disk fails its fsync under a PUT
        monkeypatch.setattr(wal_module.os, "fdatasync", lambda fd: (_ for _ in ()).throw(
            OSError(5, "Input/output error")))
        client.send_multipart(put_frames())
        # Then no ACK comes, and the broker stops saying why
        assert not client.poll(1000)
        broker.join(timeout_s=5)
        assert isinstance(broker.error, DiskFailure)
    finally:
        client.close(0)


def test_one_data_dir_serves_one_broker_and_keeps_its_partition_count(make_broker, tmp_path):
    broker, _ = durable(make_broker, tmp_path, partitions=2)
    with pytest.raises(ConfigError, match="in use"):
        make_broker(data_dir=str(tmp_path), partitions=2)
    broker.wal.close()
    with pytest.raises(ConfigError, match="2 partitions"):
        make_broker(data_dir=str(tmp_path), partitions=3)


def test_every_pass_shares_one_fsync(make_broker, tmp_path):
    broker, clock = durable(make_broker, tmp_path, partitions=6)
    syncs = broker.wal.syncs
    for n in range(10):  # ten PUTs over six partitions in one pass of the loop
        put(broker, b"{}", b"{}", ids=[f"a{n}", f"b{n}"])
    broker._sync(clock())
    assert broker.wal.syncs == syncs + 1 and broker.wal.synced_entries >= 10


def test_a_stuck_record_keeps_its_segment_and_the_later_ones_so_replay_is_exact(make_broker,
                                                                                  tmp_path):
    # Given partition 0 holds an unacknowledged record in the first segment, while partition 1
    # gets records that are acknowledged, over several segments
    broker, clock = durable(make_broker, tmp_path, partitions=2, segment_bytes=4096)
    for name in ("9090", "9091"):  # 9090 owns partition 0, 9091 partition 1
        consumer_says(broker, name, Command.HELLO)
        consumer_says(broker, name, Command.FETCH, {"credit": 1000})
    put(broker, b"{}", ids=["stuck"], key=key_for(broker, 0))
    (held,) = to(broker, "9090")
    settled = []
    for n in range(12):
        put(broker, b'{"pad":"' + b"x" * 700 + b'"}', ids=[f"id-{n}"], key=key_for(broker, 1))
        for message in to(broker, "9091"):
            for batch in message.header.get("batches", []):
                consumer_says(broker, "9091", Command.ACK, {"acks": [
                    {"partition": 1, "epoch": batch["epoch"], "offsets": batch["offsets"]}]})
                settled += batch["ids"]
        broker.wal.maybe_roll(broker._positions())
        broker.tick(clock())
    kept = [int(name[:-4]) for name in segments(tmp_path)]
    assert len(settled) == 12 and kept == list(range(1, kept[-1] + 1)) and len(kept) >= 3
    # When the broker restarts, only the unacknowledged record is back
    broker, clock = restart(broker, make_broker, tmp_path, partitions=2, segment_bytes=4096)
    assert broker.partitions[0].held_ids() == ["stuck"] and broker.partitions[1].depth == 0
    # And once it is acknowledged, the old segments go
    consumer_says(broker, "9090", Command.HELLO)
    (again,) = consumer_says(broker, "9090", Command.FETCH, {"credit": 10})[-1:]
    consumer_says(broker, "9090", Command.ACK, {"acks": [
        {"partition": 0, "epoch": only_batch(again)["epoch"],
         "offsets": only_batch(again)["offsets"]}]})
    broker.tick(clock())
    assert len(segments(tmp_path)) == 1
    del held


def key_for(broker: Any, partition: int) -> str:
    from zmqlab.intake import partition_of

    count = len(broker.partitions)
    return next(k for k in map(str, range(1000)) if partition_of(k, count) == partition)
