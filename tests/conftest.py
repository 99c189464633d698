"""Shared fixtures: a ZeroMQ context per test, unique inproc endpoints, databases."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from helpers import Clock, new_broker

from zmqlab.broker import Broker

IN_CI = bool(os.environ.get("CI"))
PG_ADMIN_URL = os.environ.get("ZMQLAB_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def endpoint() -> Callable[[str], str]:
    """A fresh ``inproc://`` address per call, so tests never share sockets."""
    return lambda name: f"inproc://{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def db_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'zmqlab.db'}"


def _pg_available() -> str | None:
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means: no server here
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the shared server; dropped afterwards.

    Skips locally when no server answers, but fails in CI, where the server must be up.
    """
    problem = _pg_available()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL must be reachable in CI: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    from sqlalchemy import create_engine, text

    name = f"zmqlab_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def make_broker(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., tuple[Broker, Clock]]]:
    """The broker harness: ``make_broker(**options)`` gives a broker on fake time (and its
    clock) to drive through its handlers. Whatever a test does, no handler may have failed
    unexpectedly (answered INTERNAL): that is checked when the test ends."""
    caplog.set_level(logging.INFO, logger="zmqlab.broker")
    yield new_broker
    internal = [r.getMessage() for r in caplog.records
                if r.name == "zmqlab.broker" and "internal error" in r.getMessage()]
    assert not internal, f"a broker handler failed unexpectedly: {internal}"
