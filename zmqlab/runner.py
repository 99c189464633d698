"""Run something in this process until SIGINT or SIGTERM: a node, a topology, a load.

A signal must never leave a started thing running, and the one rule depends on who holds the
main thread:

- a node or a supervised topology runs on other threads or processes, so a signal only sets a
  flag (``run_until_signal``): the main thread sees it at the next tick and stops what it
  started, once;
- a load, the demo or the dashboard blocks the main thread, so SIGTERM raises
  KeyboardInterrupt like Ctrl-C (``sigterm_as_interrupt``) and ``finally`` blocks stop what was
  started; while they stop, ``signals_ignored`` keeps a second signal from cutting that short.

Handlers are changed only on the main thread (the only one Python lets set them; elsewhere these
helpers change nothing) and the previous ones come back when the block ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, TypeVar

from zmqlab.errors import ZmqlabError
from zmqlab.node import Node, tune_gc

if TYPE_CHECKING:
    from zmqlab.topology import Supervisor

T = TypeVar("T")
Handler = Callable[[int, FrameType | None], object] | signal.Handlers
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _handling(handler: Handler, *signals: signal.Signals) -> Iterator[None]:
    """``handler`` for ``signals`` until the block ends, then the previous handlers again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:  # None: installed outside Python, nothing to put back
                signal.signal(sig, old)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so ``finally`` blocks stop what was started."""
    return _handling(_interrupt, signal.SIGTERM)


def signals_ignored() -> AbstractContextManager[None]:
    """Ignore SIGINT and SIGTERM while stopping, so a second one cannot leave children running."""
    return _handling(signal.SIG_IGN, *STOP_SIGNALS)


def run_until_signal(start: Callable[[], None], running: Callable[[], bool],
                     stop: Callable[[], T], tick_s: float) -> T:
    """``start()``, poll ``running()`` every ``tick_s`` until it is false or SIGINT/SIGTERM
    arrives, then return ``stop()``.

    The signals only set a flag, so ``stop`` runs once, on this thread, and a second signal
    while it runs changes nothing; it also runs when ``running`` raises. A ``start`` that
    raises propagates without ``stop``: it undoes what it began.
    """
    stopping = threading.Event()
    with _handling(lambda *_: stopping.set(), *STOP_SIGNALS):
        start()
        try:
            while running() and not stopping.wait(tick_s):
                pass
        finally:
            result = stop()
    return result


def run_node(node: Node, tick_s: float = 0.25, stop_timeout_s: float = 15.0) -> None:
    """Run one node until SIGINT/SIGTERM or until its thread ends, then stop it gracefully.

    Raises ZmqlabError when the node cannot start, or ``"<kind> failed: <error>"`` when it died
    of an error. Tunes the GC (``node.tune_gc``): the node owns this process. A node that does
    not stop within ``stop_timeout_s`` ends the process: one line on stderr, exit code 1
    (``exit_stuck``).
    """

    def start() -> None:
        tune_gc()
        node.start()

    def stop() -> None:
        try:
            node.stop(stop_timeout_s)
        except ZmqlabError as exc:  # the node's thread still runs: only an exit ends it
            exit_stuck(str(exc))

    run_until_signal(start, lambda: node.alive, stop, tick_s)
    if node.error is not None:
        raise ZmqlabError(f"{node.kind} failed: {node.error}")


def exit_stuck(why: str) -> NoReturn:
    """End the process now, with ``error: <why>; …`` on stderr and exit code 1.

    Why not raise: the thread that did not stop would run on into the interpreter's teardown,
    where whatever it does next (a log line, a socket call) can end in a traceback or a crash
    report; ``os._exit`` leaves no teardown to race. Logs and stdio are flushed first.
    """
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.write(f"error: {why}; exiting anyway\n")
    sys.stderr.flush()
    os._exit(1)


def run_supervisor(supervisor: Supervisor, on_ready: Callable[[], None] = lambda: None,
                   tick_s: float = 0.1,
                   status_endpoint: str | None = None) -> tuple[dict[str, int], str | None]:
    """Start a topology, call ``on_ready``, supervise it (``Supervisor.step`` every
    ``tick_s``: dead nodes are restarted) until SIGINT/SIGTERM or until the supervisor gives
    up on a node, then stop every node.

    With ``status_endpoint``, ``zmqlab status`` can ask there about the nodes; it is bound
    before any node starts, so an endpoint in use fails at once. Returns each node's exit code
    and why it ended early (None when a signal ended it). Raises ZmqlabError when it cannot
    start, with what it started already stopped.
    """
    from zmqlab.topology import StatusService

    failures: list[str] = []
    status = None if status_endpoint is None else StatusService(supervisor, status_endpoint)

    def start() -> None:
        if status is not None:
            status.start()
        try:
            supervisor.start()
            try:
                on_ready()
            except BaseException:
                supervisor.stop()
                raise
        except BaseException:
            if status is not None:
                status.stop()
            raise

    def running() -> bool:
        failure = supervisor.step(time.monotonic())
        if failure is not None:
            failures.append(failure)
            return False
        return True

    def stop() -> dict[str, int]:
        try:
            return supervisor.stop()
        finally:  # answered until the nodes are stopped
            if status is not None:
                status.stop()

    codes = run_until_signal(start, running, stop, tick_s)
    return codes, failures[0] if failures else None
