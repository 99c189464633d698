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


# -- every socket is bounded: high-water marks and a largest frame ----------------------------
def test_new_socket_bounds_every_socket_unless_its_caller_says_otherwise(ctx):
    from zmqlab.node import new_socket

    bounded = new_socket(ctx, zmq.DEALER)
    unbounded = new_socket(ctx, zmq.DEALER, sndhwm=0, maxmsgsize=-1)
    try:
        assert bounded.getsockopt(zmq.LINGER) == 0
        assert bounded.getsockopt(zmq.SNDHWM) == bounded.getsockopt(zmq.RCVHWM) \
            == proto.SOCKET_HWM
        assert bounded.getsockopt(zmq.MAXMSGSIZE) == proto.MAX_FRAME_BYTES
        assert unbounded.getsockopt(zmq.SNDHWM) == 0
        assert unbounded.getsockopt(zmq.MAXMSGSIZE) == -1
        assert unbounded.getsockopt(zmq.RCVHWM) == proto.SOCKET_HWM
    finally:
        bounded.close(0)
        unbounded.close(0)


def test_a_peer_sending_a_frame_larger_than_max_frame_bytes_is_disconnected(ctx):
    """Given a node's ROUTER on TCP and a peer watched by a socket monitor,
    when the peer sends one frame a byte over MAX_FRAME_BYTES,
    then the node drops the peer's connection instead of taking the frame,
    and still serves the peer's next (reasonable) request after it reconnects."""
    from zmq.utils.monitor import recv_monitor_message

    from zmqlab.node import new_socket

    server = new_socket(ctx, zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    monitor = peer.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    peer.connect(f"tcp://127.0.0.1:{port}")

    def next_event() -> int:
        assert monitor.poll(10_000), "no connection event within 10 s"
        return int(recv_monitor_message(monitor)["event"])

    try:
        assert next_event() == zmq.EVENT_CONNECTED
        peer.send_multipart([b"", b"x" * (proto.MAX_FRAME_BYTES + 1)])
        assert next_event() == zmq.EVENT_DISCONNECTED
        assert not server.poll(0)  # nothing of it was delivered
        assert next_event() == zmq.EVENT_CONNECTED  # ZeroMQ reconnects on its own
        peer.send_multipart([b"", b"small"])
        assert recv(server, 5.0)[1:] == [b"", b"small"]
    finally:
        peer.disable_monitor()
        monitor.close(0)
        peer.close(0)
        server.close(0)


# -- runner: a stop that times out ends the process with one line -----------------------------
STUCK_NODE = """
import threading
from zmqlab.node import Node
from zmqlab.runner import run_node

class Stuck(Node):
    kind = "broker"

    def serve(self, control):
        self.bound()
        print("serving", flush=True)
        threading.Event().wait(120)  # never looks at its control socket

    def stop(self, timeout_s=15.0):
        super().stop(0.5)  # a short wait, so that the test does not take 15 s

run_node(Stuck(None))
print("run_node returned", flush=True)
"""


def test_a_node_that_does_not_stop_in_time_ends_the_process_with_one_line_and_code_1():
    """Given a node that never looks at its control socket, run by ``runner.run_node``,
    when SIGTERM asks it to stop and the stop times out,
    then stderr holds one line saying so, no traceback, and the exit code is 1."""
    import select
    import signal

    process = subprocess.Popen([sys.executable, "-c", STUCK_NODE], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready and process.stdout.readline() == "serving\n"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 1, (out, err)
    assert "Traceback" not in err
    assert err.splitlines() == ["error: broker did not stop within 0.5 s; exiting anyway"]
    assert "returned" not in out
