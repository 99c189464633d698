"""A consumer whose PostgreSQL server stops holds its records and finishes them when the
server is back. The test runs a private server (initdb + pg_ctl on a spare port, as the
postgres user) so the shared server other tests use is never touched."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Fabric, free_port, wait_until
from sqlalchemy import func, select

from zmqlab.producer import make_record
from zmqlab.store import RECORDS, make_engine

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


class PrivateServer:
    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins or os.geteuid() != 0 or shutil.which("runuser") is None:
            raise RuntimeError("needs root, runuser and PostgreSQL's server binaries")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="zmqlab-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                          "-U", "postgres", "--no-sync")

    def _as_postgres(self, *argv: str) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                                text=True, timeout=120, cwd=self.dir)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr or result.stdout}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=20")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
                          "-o", options, "-l", str(self.dir / "server.log"), "start")

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast",
                          "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[PrivateServer]:
    try:
        private = PrivateServer()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the database-outage test must run in CI: {exc}")
        pytest.skip(str(exc))
    try:
        private.start()
        yield private
    finally:
        private.remove()


def test_records_wait_in_the_queue_while_postgresql_is_down(ctx, server: PrivateServer):
    fabric = Fabric(ctx, server.url, producers=1, consumers=0, partitions=2, heartbeat_ms=200)
    fabric.start()
    consumer = fabric.add_consumer("9090", retry_initial_s=0.05, retry_max_s=0.3)
    engine = make_engine(server.url)

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(RECORDS)).scalar_one())

    try:
        with fabric.client("8080") as client:
            client.send_batch([make_record({"n": n}) for n in range(100)])
            wait_until(lambda: count() == 100, 30, "first records stored")
            engine.dispose()
            server.stop()
            client.send_batch([make_record({"n": n}) for n in range(100, 200)])
        wait_until(lambda: consumer.stats["sink_errors"] >= 1, 30, "the consumer to notice")
        snap = fabric.status()
        assert sum(p["depth"] for p in snap["partitions"]) == 100  # held, not acknowledged
        assert snap["counters"]["expired"] == 0 and len(snap["consumers"]) == 1
        assert consumer.sink_error

        server.start()
        wait_until(lambda: count() == 200, 60, "the held records stored after the restart")
        wait_until(lambda: all(p["depth"] == 0 for p in fabric.status()["partitions"]), 30,
                   "the queue to empty")
        assert consumer.sink_error is None
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(RECORDS.c.id))]
        assert len(ids) == len(set(ids)) == 200
    finally:
        engine.dispose()
        fabric.stop()
