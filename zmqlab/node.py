"""What every node shares: its own thread, a control pipe to stop it, and socket helpers.

A node creates its sockets inside ``run()`` on its own thread (sockets never cross threads);
``stop()`` may be called from any thread because it talks to the node through an ``inproc``
PUSH/PULL control pipe that the node polls with its other sockets.
"""

from __future__ import annotations

import gc
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

from zmqlab import protocol as proto
from zmqlab.errors import ErrorCode, ProtocolError, ReplyError, ZmqlabError
from zmqlab.protocol import Command

STOP = b"STOP"
# Micro-optimization: plain ints, because IntFlag arithmetic runs in Python.
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
# Micro-optimization: pyzmq's ``Socket.send`` is a Python wrapper (for DRAFT routing ids and
# groups, which zmqlab does not use) around the compiled backend's send; we call the backend.
_send_frame = _BackendSocket.send
_recv_frame = _BackendSocket.recv


def send_frames(sock: zmq.Socket[Any], frames: Sequence[bytes], flags: int = 0) -> None:
    """``send_multipart`` without its per-frame Python overhead.

    Micro-optimization: pyzmq's version combines ``zmq.SNDMORE | flags`` as ``IntFlag`` for
    every frame, which runs in Python; here the flags are plain ints. ZeroMQ delivers a
    multipart message whole or not at all, so this is as atomic as the original.
    """
    send = _send_frame
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        send(sock, frame, flags | _SNDMORE if index < last else flags)


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """``recv_multipart`` without its per-frame Python overhead.

    Micro-optimization: plain-int flags (as in ``send_frames``), and whether more frames
    follow is read off each received Frame (a C property) instead of ``getsockopt(RCVMORE)``,
    which converts the option to a ``SocketOption`` enum in Python on every frame.
    """
    frame = _recv_frame(sock, flags, False)
    frames: list[bytes] = [frame.bytes]
    while frame.more:
        frame = _recv_frame(sock, flags, False)
        frames.append(frame.bytes)
    return frames


# Collect the youngest generation every 50,000 container allocations instead of 700.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Make the garbage collector cheap for a process that runs nodes or a load and exits.

    Nothing on the hot paths makes reference cycles, but every message makes short-lived
    lists and dicts, and with the default thresholds each collection of the oldest
    generation walks every object that imports left behind (SQLAlchemy, pydantic, rich).
    ``gc.freeze`` takes those out of every future collection and higher thresholds make
    collections rarer. Cycles are still collected. Called by the CLI for its own process
    only: an application that embeds a node decides for itself.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Every socket's bounds unless its caller passes its own (``sndhwm=0`` and the like).
SOCKET_DEFAULTS: dict[str, int] = {"linger": 0, "sndhwm": proto.SOCKET_HWM,
                                   "rcvhwm": proto.SOCKET_HWM,
                                   "maxmsgsize": proto.MAX_FRAME_BYTES}


def new_socket(context: zmq.Context[Any], kind: int, **options: Any) -> zmq.Socket[Any]:
    """A socket with ``SOCKET_DEFAULTS`` set, then ``options`` (which win).

    On purpose on every socket: ``linger=0``, so a node that stops never blocks on unsent
    messages; high-water marks of ``SOCKET_HWM`` messages per peer and direction, so a peer
    that does not read makes its sender push back instead of grow; and ``MAXMSGSIZE`` of
    ``MAX_FRAME_BYTES``, so a peer cannot make a node allocate a frame without bound (ZeroMQ
    drops the connection of a peer that sends a bigger one).
    """
    sock: zmq.Socket[Any] = context.socket(kind)
    for name, value in {**SOCKET_DEFAULTS, **options}.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    return sock


def bind(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ZmqlabError(f"cannot bind {what} on {endpoint}: {exc}") from None


# ``handler(route, message)``: the reply frames, or None to answer later to
# ``[*route, EMPTY, *reply]`` (the route is the sender's identity and any request tag, see
# ``protocol.split_envelope``).
Handler = Callable[[list[bytes], proto.Message], list[bytes] | None]

_log = logging.getLogger("zmqlab.node")


def answer_request(handlers: Mapping[Command, Handler], route: list[bytes],
                   body: list[bytes], *, log: logging.Logger = _log,
                   unknown: str = "{command} is not served here") -> list[bytes] | None:
    """The reply to one request: its handler's, or ERR.

    A ``ReplyError`` (a bad message, a refusal) becomes ``[ERR, code, reason]``; any other
    exception is logged with its traceback and answered ``INTERNAL``, so one bad request never
    stops the node. ``unknown`` is the reason given for a command without a handler.
    """
    try:
        message = proto.decode(body)
        handler = handlers.get(message.command)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                unknown.format(command=message.command.name))
        return handler(route, message)
    except ReplyError as exc:
        return proto.encode_err(exc.code, exc.reason)
    except Exception as exc:  # keep serving; the client learns something went wrong
        log.exception("internal error answering a request")
        return proto.encode_err(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def send_reply(sock: zmq.Socket[Any], route: Sequence[bytes], body: Sequence[bytes]) -> bool:
    """Send ``body`` back along ``route`` on a ROUTER without blocking; False when it was
    dropped because the peer's pipe is full (``EAGAIN``) or the peer is gone (``EHOSTUNREACH``,
    with ``ROUTER_MANDATORY``).

    Why: a slow or hostile peer must never stall the node that answers it; whoever asked has
    its own reply timeout and retry, which cover a dropped reply.
    """
    try:
        send_frames(sock, proto.envelope(route, body), NOBLOCK)
    except zmq.Again:
        return False
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EHOSTUNREACH:
            raise
        return False
    return True


def serve_requests(sock: zmq.Socket[Any], handlers: Mapping[Command, Handler], *,
                   log: logging.Logger = _log, unknown: str = "{command} is not served here",
                   limit: int = 256,
                   dropped: Callable[[list[bytes]], None] | None = None) -> None:
    """Answer what waits on a ROUTER (non-blocking, at most ``limit`` messages).

    Each request goes through ``answer_request``, the one place where a ROUTER ingress turns
    an error into an ERR reply; a message without an envelope has nobody to answer. Replies
    go out through ``send_reply``; ``dropped(route)`` hears of each one it could not send.
    """
    for _ in range(limit):
        try:
            frames = recv_frames(sock, NOBLOCK)
        except zmq.Again:
            return
        try:
            route, body = proto.split_envelope(frames)
        except ProtocolError:
            continue  # no envelope: nobody to answer
        reply = answer_request(handlers, route, body, log=log, unknown=unknown)
        if reply is not None and not send_reply(sock, route, reply) and dropped is not None:
            dropped(route)


class Node:
    """Thread plumbing: ``start()``/``stop()`` around a subclass's ``serve(control)``."""

    kind = "node"

    def __init__(self, context: zmq.Context[Any] | None) -> None:
        self.context: zmq.Context[Any] = context or zmq.Context.instance()
        self._control_endpoint = f"inproc://zmqlab-control-{uuid.uuid4().hex}"
        self._bound = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.log = logging.getLogger(f"zmqlab.{self.kind}")

    def serve(self, control: zmq.Socket[Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def bound(self) -> None:
        """Called by ``serve`` once its sockets are bound, so ``start`` can return."""
        self._bound.set()

    def run(self) -> None:
        """Run the node's loop in the calling thread until ``stop()``."""
        control = new_socket(self.context, zmq.PULL)
        control.bind(self._control_endpoint)
        try:
            self.serve(control)
        finally:
            control.close(0)

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by start()/join(), logged for the CLI
            self.error = exc
            if not isinstance(exc, ZmqlabError):
                self.log.exception("%s stopped by an unexpected error", self.kind)
        finally:
            self._bound.set()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the node on its own thread; return once it listens (or raise why it can't)."""
        self._thread = threading.Thread(target=self._main, name=f"zmqlab-{self.kind}", daemon=True)
        self._thread.start()
        if not self._bound.wait(timeout_s):
            raise ZmqlabError(f"{self.kind} did not start within {timeout_s} s")
        if self.error is not None:
            raise self.error

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask the loop to stop and wait for its thread (if it was started with ``start``)."""
        if self._thread is not None and not self._thread.is_alive():
            return
        pipe = new_socket(self.context, zmq.PUSH)
        pipe.setsockopt(zmq.LINGER, 1000)
        pipe.connect(self._control_endpoint)
        pipe.send(STOP)
        pipe.close()
        self.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise ZmqlabError(f"{self.kind} did not stop within {timeout_s:g} s")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
