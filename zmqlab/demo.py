"""Loads from start to verdict: ``load_and_verify`` (``zmqlab load``) and ``run_demo``
(``zmqlab demo``: the seed topology started around a load, verified, then stopped).

The demo's promise is its lifetime: every process it starts is stopped before it returns, also
on Ctrl-C or SIGTERM, and its children's logs are kept only when it failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from zmqlab.errors import ZmqlabError
from zmqlab.loadgen import LoadOptions, LoadReport, parse_endpoints, run_load, verify
from zmqlab.node import tune_gc
from zmqlab.render import LoadProgress, verdict
from zmqlab.runner import signals_ignored, sigterm_as_interrupt
from zmqlab.topology import Supervisor, Topology, query_status


def load_options(endpoints: str, **options: Any) -> LoadOptions:
    """``LoadOptions`` with comma-separated endpoints (``tcp://h:8080,8081``); ConfigError
    when an option is bad."""
    return LoadOptions(endpoints=tuple(parse_endpoints(endpoints)), **options)


def _verify(db_url: str, report: LoadReport, timeout_s: float) -> None:
    acked = report.acked_ids()
    report.verified = verify(db_url, acked.keys(), acked, timeout_s, prefix=report.prefix)


def load_and_verify(options: LoadOptions, verify_db: str | None, verify_timeout_s: float,
                    progress: LoadProgress | None = None) -> LoadReport:
    """Run a load, then (unless it was interrupted) check in ``verify_db`` that every
    acknowledged record was stored once.

    Ctrl-C ends the load or the check with ``report.interrupted``; a database that cannot be
    read raises ZmqlabError ``"cannot verify <url>: …"``. Tunes this process's GC
    (``node.tune_gc``), as a command that owns its process.
    """
    tune_gc()
    with progress or nullcontext():
        report = run_load(options, progress=progress)
    if verify_db is not None and not report.interrupted:
        try:
            _verify(verify_db, report, verify_timeout_s)
        except KeyboardInterrupt:
            report.interrupted = True
        except ZmqlabError as exc:
            raise ZmqlabError(f"cannot verify {verify_db}: {exc}") from exc
    return report


@dataclass
class DemoResult:
    """What ``run_demo`` saw. ``failure`` is None exactly when the demo succeeded."""

    log_dir: str  # the children's logs; removed when the demo succeeded
    report: LoadReport | None = None  # None when the topology did not start
    snapshot: dict[str, Any] | None = None  # the broker's STATS once the database caught up
    failure: str | None = None  # why the demo failed, in one line
    codes: dict[str, int] = field(default_factory=dict)  # each node's exit code

    @property
    def interrupted(self) -> bool:
        return self.failure == "interrupted" or (self.report is not None
                                                 and self.report.interrupted)

    def to_json(self) -> dict[str, Any] | None:
        """The load report with the broker's snapshot and the failure; None without a load."""
        if self.report is None:
            return None
        return {**self.report.to_json(), "status": self.snapshot, "failure": self.failure}

    def log_tails(self, lines: int = 15) -> list[tuple[str, str]]:
        """(file name, its last ``lines`` lines) for each child's log that is not empty."""
        tails = [(name, _tail(os.path.join(self.log_dir, name), lines))
                 for name in sorted(os.listdir(self.log_dir))]
        return [(name, text) for name, text in tails if text.strip()]


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            return b"\n".join(handle.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return ""


def _quiet(line: str) -> None:
    pass


def run_demo(topology: Topology, options: LoadOptions, verify_timeout_s: float, *,
             say: Callable[[str], None] = _quiet,
             progress: LoadProgress | None = None) -> DemoResult:
    """Start ``topology``, send the load ``options`` through it, verify ``topology.db_url``,
    take the broker's snapshot, and stop every process it started, whatever happens.

    SIGTERM is taken as Ctrl-C; either ends the demo as ``"interrupted"``, and while the nodes
    stop a second one is ignored. ``say`` receives one line per step. Tunes this process's GC.
    """
    result = DemoResult(log_dir=tempfile.mkdtemp(prefix="zmqlab-demo-"))
    supervisor = Supervisor(topology, log_dir=result.log_dir)
    with sigterm_as_interrupt():
        try:
            say(f"starting broker, {topology.producers} producers, {topology.consumers} "
                f"consumers (logs in {result.log_dir}) …")
            began = time.monotonic()
            supervisor.start()
            say(f"ready in {time.monotonic() - began:.1f} s; sending {options.records} records "
                f"of {options.size} bytes with {options.clients} clients")
            tune_gc()
            with progress or nullcontext():
                report = result.report = run_load(options, progress=progress)
            supervisor.check_alive()
            if not report.interrupted:
                say(f"verifying {topology.db_url} …")
                _verify(topology.db_url, report, verify_timeout_s)
                result.snapshot = query_status(topology.frontend, timeout_ms=2000)
            result.failure = verdict(report)
        except KeyboardInterrupt:
            result.failure = "interrupted"
        except ZmqlabError as exc:
            result.failure = str(exc)
        finally:
            with signals_ignored():
                result.codes = supervisor.stop()
    result.failure = result.failure or _bad_exits(result.codes)
    if result.failure is None:
        shutil.rmtree(result.log_dir, ignore_errors=True)
    return result


def _bad_exits(codes: dict[str, int], fine: Collection[int] = (0, -signal.SIGTERM)) -> str | None:
    bad = [f"{name}={code}" for name, code in codes.items() if code not in fine]
    return "node(s) exited badly: " + ", ".join(bad) if bad else None
