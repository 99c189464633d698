"""The pipelined producer client: a window of PUTs in flight, answers matched by tag.

Scripted peers are plain ROUTER sockets answering by hand, so each test decides the order,
the silence or the refusal the client meets. Every wait is bounded: the client is pumped with
short timeouts until a condition holds or a deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq
from helpers import Fabric, wait_until

from zmqlab import protocol as proto
from zmqlab.errors import ConfigError, ProtocolError, ZmqlabError
from zmqlab.loadgen import LoadOptions, run_load
from zmqlab.pipelined import Completion, PipelinedProducer
from zmqlab.producer import OutRecord, make_record
from zmqlab.protocol import Command


def _records(n: int, prefix: str) -> list[OutRecord]:
    return [make_record({"i": i}, id=f"{prefix}{i}") for i in range(n)]


def _collect(client: PipelinedProducer, want: int, timeout_s: float = 10.0) -> list[Completion]:
    """Pump the client until ``want`` requests are over (bounded by ``timeout_s``)."""
    done: list[Completion] = []
    deadline = time.monotonic() + timeout_s
    while len(done) < want:
        assert time.monotonic() < deadline, f"{len(done)} of {want} requests completed"
        done += client.pump(0.05)
    return done


def _router(ctx: zmq.Context[Any], url: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(url)
    return sock


def _next(server: zmq.Socket[Any], client: PipelinedProducer | None = None,
          timeout_s: float = 5.0) -> tuple[list[bytes], proto.Message]:
    """The next request the scripted peer gets (pumping the client meanwhile, so that its
    timeouts and backoffs run)."""
    deadline = time.monotonic() + timeout_s
    while not server.poll(20):
        assert time.monotonic() < deadline, "the peer got no request"
        if client is not None:
            client.pump(0.0)
    route, body = proto.split_envelope(server.recv_multipart())
    return route, proto.decode(body)


def _answer(server: zmq.Socket[Any], route: list[bytes], reply: list[bytes]) -> None:
    server.send_multipart([*route, proto.EMPTY, *reply])


def _ack(placed: list[list[Any]], dups: list[list[Any]] | None = None,
         errors: list[list[Any]] | None = None) -> list[bytes]:
    return proto.encode_parts(Command.ACK, [proto.dump(
        {"acks": placed, "dups": dups or [], "errors": errors or []})])


def _welcome(server: zmq.Socket[Any], client: PipelinedProducer | None = None) -> None:
    route, hello = _next(server, client)
    assert hello.command is Command.HELLO and hello.header["role"] == "producer"
    _answer(server, route, proto.encode(Command.WELCOME, {"partitions": 6}))


@pytest.fixture
def url(endpoint: Callable[[str], str]) -> str:
    return endpoint("peer")


def test_the_envelope_route_is_everything_before_the_delimiter() -> None:
    assert proto.split_envelope([b"id", b"", b"PUT"]) == ([b"id"], [b"PUT"])
    assert proto.split_envelope([b"id", b"tag", b"", b"PUT", b"x"]) == ([b"id", b"tag"],
                                                                         [b"PUT", b"x"])
    with pytest.raises(ProtocolError):
        proto.split_envelope([b"id", b"a", b"b", b"c", b"d", b"", b"PUT"])  # too long a route
    with pytest.raises(ProtocolError):
        proto.split_envelope([b"id"])


def test_bad_options_are_refused_before_any_socket() -> None:
    with pytest.raises(ConfigError, match="window"):
        PipelinedProducer("inproc://nowhere", window=0)
    with pytest.raises(ConfigError, match="endpoint"):
        PipelinedProducer(["inproc://a", "127.0.0.1:8080"])
    with pytest.raises(ConfigError, match="window"):
        LoadOptions(("inproc://nowhere",), window=0)


def test_a_window_of_puts_through_a_producer_service_is_acked_once_each(ctx, db_url) -> None:
    # Given a fabric with one producer service and a client keeping 4 PUTs in flight
    fabric = Fabric(ctx, db_url, producers=1, consumers=1).start()
    try:
        client = PipelinedProducer(fabric.ingress["8080"], context=ctx, window=4,
                                   timeout_ms=5000)
        batches = [_records(25, f"b{k}-") for k in range(12)]
        done: list[Completion] = []
        submitted = peak = 0
        deadline = time.monotonic() + 15
        # When 12 batches go through it as fast as the window allows
        while len(done) < len(batches):
            assert time.monotonic() < deadline
            while client.free and submitted < len(batches):
                client.submit(batches[submitted], token=submitted)
                submitted += 1
            peak = max(peak, client.in_flight)
            done += client.pump(0.2)
        client.close()
        appended = wait_until(lambda: sum(p["appended"] for p in fabric.status()["partitions"])
                              or None, what="records in the broker")
    finally:
        fabric.stop()
    # Then the window was used, every batch completed once, and each record got its own ack
    assert peak == 4
    assert sorted(c.token for c in done) == list(range(12))
    for completion in done:
        assert not completion.outcome.refusals and completion.outcome.acked == 25
        assert [a.id for a in completion.outcome.acks(completion.records)] == [
            r.id for r in completion.records]
    assert appended == 300
    assert client.stats["acked"] == 300 and client.stats["resends"] == 0


def test_answers_are_matched_by_tag_in_any_order(ctx, url) -> None:
    # Given a peer that answers three PUTs last first
    server = _router(ctx, url)
    client = PipelinedProducer(url, context=ctx, window=3, timeout_ms=5000)
    for k in range(3):
        client.submit(_records(2, f"k{k}-"), token=k)
    assert client.free == 0
    with pytest.raises(ZmqlabError, match="window"):
        client.submit(_records(1, "extra-"))
    _welcome(server)
    requests = [_next(server) for _ in range(3)]
    assert [m.header["ids"] for _, m in requests] == [[f"k{k}-0", f"k{k}-1"] for k in range(3)]
    for k, (route, _) in reversed(list(enumerate(requests))):
        _answer(server, route, _ack([[0, 2, k, 100 * k]]))
    # When the client reads the answers
    done = _collect(client, 3)
    # Then each went to its own request
    assert [c.token for c in done] == [2, 1, 0]
    for completion in done:
        k = completion.token
        acks = completion.outcome.acks(completion.records)
        assert [(a.partition, a.offset) for a in acks] == [(k, 100 * k), (k, 100 * k + 1)]
    assert client.partitions == 6 and client.free == 3
    client.close()
    server.close()


def test_a_silent_put_is_resent_and_the_late_answer_to_its_first_try_is_ignored(ctx, url) -> None:
    # Given a peer that lets the first try of a PUT time out
    server = _router(ctx, url)
    client = PipelinedProducer(url, context=ctx, window=2, timeout_ms=100, retries=2)
    client.submit(_records(2, "r-"), token="a")
    _welcome(server)
    first_route, first = _next(server)
    # When the client resends it, and the peer then answers both tries
    second_route, second = _next(server, client)
    assert second.header["ids"] == first.header["ids"] and second_route != first_route
    _answer(server, first_route, _ack([[0, 2, 0, 0]]))  # late: the client stopped waiting
    _answer(server, second_route, _ack([], dups=[[0, 0, 0], [1, 0, 1]]))
    done = _collect(client, 1)
    # Then the request completes once, on the answer to the try it waited for
    assert len(done) == 1 and done[0].token == "a"
    assert done[0].outcome.acked == 2 and len(done[0].outcome.dups) == 2
    assert client.stats["resends"] == 1 and client.stats["duplicates"] == 2
    assert client.pump(0.05) == []  # nothing more comes of the first try's answer
    client.close()
    server.close()


def test_a_refused_put_backs_off_without_holding_up_the_window(ctx, url) -> None:
    # Given two PUTs in flight, the first refused for lack of room (retryable)
    server = _router(ctx, url)
    client = PipelinedProducer(url, context=ctx, window=2, timeout_ms=5000,
                               backoff_initial_s=0.05)
    client.submit(_records(3, "full-"), token="full")
    client.submit(_records(2, "ok-"), token="ok")
    _welcome(server)
    (route_a, _), (route_b, _) = _next(server), _next(server)
    _answer(server, route_a, _ack([[0, 1, 0, 0]], errors=[[1, "PARTITION_FULL", "full", True],
                                                          [2, "PARTITION_FULL", "full", True]]))
    _answer(server, route_b, _ack([[0, 2, 1, 0]]))
    # When the second is answered while the first backs off
    done = _collect(client, 1)
    assert [c.token for c in done] == ["ok"]
    # Then only the refused records are sent again, after the backoff
    route, retry = _next(server, client)
    assert retry.header["ids"] == ["full-1", "full-2"]
    _answer(server, route, _ack([[0, 2, 0, 1]]))
    done = _collect(client, 1)
    assert done[0].token == "full" and done[0].outcome.acked == 3
    assert [a.offset for a in done[0].outcome.acks(done[0].records)] == [0, 1, 2]
    assert client.stats["backpressure_retries"] == 2
    client.close()
    server.close()


def test_a_refusal_that_outlives_the_deadline_is_reported(ctx, url) -> None:
    server = _router(ctx, url)
    client = PipelinedProducer(url, context=ctx, window=1, timeout_ms=5000)
    client.submit(_records(1, "late-"), token="late", deadline=time.monotonic())
    _welcome(server)
    route, _ = _next(server)
    _answer(server, route, _ack([], errors=[[0, "PARTITION_FULL", "full", True]]))
    done = _collect(client, 1)
    refusal = done[0].outcome.refusals[0]
    assert refusal.code == "PARTITION_FULL" and "deadline" in refusal.reason
    client.close()
    server.close()


def test_a_forgotten_client_says_hello_again_and_resends(ctx, url) -> None:
    # Given a peer (a restarted broker) that does not know the client
    server = _router(ctx, url)
    client = PipelinedProducer(url, context=ctx, window=1, timeout_ms=5000)
    client.submit(_records(2, "x-"), token="x")
    _welcome(server)
    route, put = _next(server)
    _answer(server, route, proto.encode_err("NOT_REGISTERED", "say HELLO"))
    # Then it registers again and the same records follow
    _welcome(server, client)
    route, again = _next(server, client)
    assert again.command is Command.PUT and again.header["ids"] == put.header["ids"]
    _answer(server, route, _ack([[0, 2, 3, 7]]))
    assert _collect(client, 1)[0].outcome.acked == 2
    client.close()
    server.close()


def test_a_silent_endpoint_fails_over_with_everything_in_flight(ctx, db_url, url) -> None:
    # Given a first endpoint that never answers and a working producer service after it
    silent = _router(ctx, url)
    fabric = Fabric(ctx, db_url, producers=1, consumers=1).start()
    try:
        client = PipelinedProducer([url, fabric.ingress["8080"]], context=ctx, window=3,
                                   timeout_ms=100, retries=1)
        for k in range(3):
            client.submit(_records(10, f"f{k}-"), token=k)
        # When the tries on the first run out
        done = _collect(client, 3)
        client.close()
    finally:
        fabric.stop()
        silent.close()
    # Then all three went to the second, whole
    assert sorted(c.token for c in done) == [0, 1, 2]
    assert all(c.outcome.acked == 10 and not c.outcome.refusals for c in done)
    assert client.stats["failovers"] == 1 and client.endpoint == fabric.ingress["8080"]


def test_when_every_endpoint_is_silent_the_records_are_refused_unavailable(ctx, endpoint) -> None:
    urls = [endpoint("silent-a"), endpoint("silent-b")]
    servers = [_router(ctx, u) for u in urls]
    client = PipelinedProducer(urls, context=ctx, window=2, timeout_ms=50, retries=1)
    client.submit(_records(4, "a-"), token="a")
    client.submit(_records(3, "b-"), token="b")
    done = _collect(client, 2)
    assert {c.token: len(c.outcome.refusals) for c in done} == {"a": 4, "b": 3}
    reason = done[0].outcome.refusals[0].reason
    assert done[0].outcome.refusals[0].code == "UNAVAILABLE"
    assert urls[0] in reason and urls[1] in reason and "2 tries of 50 ms" in reason
    assert client.unavailable and client.free == 0 and client.socket is None
    with pytest.raises(ZmqlabError, match="no answer"):
        client.submit(_records(1, "c-"))
    for server in servers:
        server.close()


@pytest.mark.parametrize("window", [1, 4])
def test_pipelined_puts_parked_at_the_broker_get_their_own_answers(ctx, db_url,
                                                                  window: int) -> None:
    # Given a broker with room for 20 records in all, and a client sending straight to it
    fabric = Fabric(ctx, db_url, producers=0, consumers=1, partitions=1, capacity=20,
                    credit=5).start()
    try:
        # When 8 PUTs of 10 go with up to ``window`` in flight (most wait at the broker)
        report = run_load(LoadOptions((fabric.frontend,), records=80, clients=1, batch=10,
                                      window=window, deadline_s=20), run_id="parked",
                          context=ctx)
        status = fabric.status()
    finally:
        fabric.stop()
    # Then every record was acknowledged once, in place
    assert report.acked == 80 and report.refused == 0 and report.ok
    assert status["partitions"][0]["appended"] == 80
    if window > 1:  # four PUTs of 10 at once cannot all fit in 20: some were parked
        assert fabric.broker.counters["waited"] > 0
    assert sum(n for _, n in report.ack_latencies) == 80


def test_closing_says_bye_and_waits_for_its_answer_a_bounded_time(ctx, url) -> None:
    # Given a client registered with a peer
    server = _router(ctx, url)
    client = PipelinedProducer(url, context=ctx, window=1, timeout_ms=5000)
    client.submit(_records(1, "bye-"), token="x")
    _welcome(server)
    route, _ = _next(server)
    _answer(server, route, _ack([[0, 1, 0, 0]]))
    assert _collect(client, 1)[0].outcome.acked == 1
    # When it is closed while the peer does not answer the BYE
    began = time.monotonic()
    client.close()
    # Then the BYE went out (the peer forgets the client now, not when it expires), and the
    # close waited no longer than its bound
    assert time.monotonic() - began < 2.0
    _, bye = _next(server)
    assert bye.command is Command.BYE and client.socket is None
    server.close()
