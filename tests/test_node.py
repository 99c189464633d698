"""node helpers: the frame loop, the request loop of ROUTER ingress sockets, and the GC
setting the CLI applies to its own processes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import zmq
from helpers import recv

from zmqlab import protocol as proto
from zmqlab.config import ProducerConfig
from zmqlab.errors import ErrorCode, Refused
from zmqlab.node import recv_frames, send_frames, serve_requests
from zmqlab.producer import ProducerService
from zmqlab.protocol import Command


def test_send_frames_and_recv_frames_carry_a_multipart_message_whole(ctx):
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://node-frames")
    b.connect("inproc://node-frames")
    try:
        send_frames(a, [b"one", b"", b"x" * 100_000])
        assert b.poll(2000)
        assert recv_frames(b) == [b"one", b"", b"x" * 100_000]
    finally:
        a.close(0)
        b.close(0)


def test_tune_gc_raises_the_thresholds_and_cycles_are_still_collected():
    script = (
        "import gc, weakref\n"
        "from zmqlab.node import GC_THRESHOLDS, tune_gc\n"
        "tune_gc()\n"
        "assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
        "class Node: pass\n"
        "a, b = Node(), Node(); a.other, b.other = b, a\n"
        "alive = weakref.ref(a); del a, b\n"
        "gc.collect()\n"
        "assert alive() is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- serve_requests: the one place a ROUTER ingress turns errors into ERR replies -------------
@pytest.fixture
def peers(ctx, endpoint):
    """A ROUTER to serve with ``serve_requests`` and a REQ client connected to it."""
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.REQ)
    for sock in (server, client):
        sock.setsockopt(zmq.LINGER, 0)
    url = endpoint("node-serve")
    server.bind(url)
    client.connect(url)
    yield server, client
    server.close(0)
    client.close(0)


def _ask(server, client, handlers, frames, **options) -> proto.Message:
    client.send_multipart(frames)
    assert server.poll(2000)
    serve_requests(server, handlers, **options)
    return proto.decode(recv(client, 2.0))


def test_an_unexpected_error_is_answered_internal_logged_and_the_next_request_served(
        peers, caplog):
    """Given a handler that raises RuntimeError,
    when a client asks it, then the client gets INTERNAL, the traceback is logged,
    and the next request is answered as usual."""

    def broken(_route, _message):
        raise RuntimeError("boom")

    handlers = {Command.STATS: broken, Command.HEARTBEAT: lambda _r, m: proto.encode(m.command)}
    server, client = peers
    with caplog.at_level(logging.ERROR, logger="zmqlab.node"):
        reply = _ask(server, client, handlers, proto.encode(Command.STATS))
    assert reply.command is Command.ERR
    assert proto.error_of(reply) == ("INTERNAL", "RuntimeError: boom", False)
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert _ask(server, client, handlers, proto.encode(Command.HEARTBEAT)).command \
        is Command.HEARTBEAT


def test_refusals_bad_messages_and_unknown_commands_are_answered_err(peers):
    def full(_route, _message):
        raise Refused(ErrorCode.PARTITION_FULL, "try later")

    handlers = {Command.PUT: full}
    server, client = peers
    refused = _ask(server, client, handlers, proto.encode(Command.PUT))
    assert proto.error_of(refused) == (ErrorCode.PARTITION_FULL, "try later", True)
    unknown = _ask(server, client, handlers, proto.encode(Command.STATS),
                   unknown="{command} is not served by this test")
    assert proto.error_of(unknown) == (ErrorCode.UNKNOWN_COMMAND,
                                       "STATS is not served by this test", False)
    garbled = _ask(server, client, handlers, [b"ZQL0", b"PUT", b"{}"])
    assert proto.error_of(garbled)[0] == ErrorCode.BAD_VERSION


def test_a_producer_service_keeps_serving_after_an_unexpected_error(ctx, endpoint, monkeypatch):
    """Given a producer service whose status snapshot fails once,
    then STATS is answered INTERNAL and the service still answers HELLO."""
    ingress = endpoint("ingress")
    service = ProducerService(ProducerConfig(name="8080", broker=endpoint("nobroker"),
                                             ingress=ingress), context=ctx)
    service.start()
    calls = {"n": 0}
    real = service.snapshot

    def fails_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("lost")
        return real()

    monkeypatch.setattr(service, "snapshot", fails_once)
    client = ctx.socket(zmq.REQ)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(ingress)
    try:
        client.send_multipart(proto.encode(Command.STATS))
        reply = proto.decode(recv(client, 5.0))
        assert proto.error_of(reply)[0] == ErrorCode.INTERNAL
        client.send_multipart(proto.encode_hello_producer("client"))
        assert proto.decode(recv(client, 5.0)).command is Command.WELCOME
        client.send_multipart(proto.encode(Command.STATS))
        assert proto.decode(recv(client, 5.0)).header["name"] == "8080"
        assert service.alive
    finally:
        client.close(0)
        service.stop()
