"""What every command module shares: the two consoles, ``fail``, option types, config checks.

Imports stay light (typer, rich's console, config and errors) because every command, including
``zmqlab broker``, loads this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from zmqlab import logs
from zmqlab.errors import ZmqlabError

T = TypeVar("T")

err = Console(stderr=True)
out = Console()

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
LogJson = Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line.")]
HeartbeatMs = Annotated[int, typer.Option("--heartbeat-ms", min=10,
                                          help="Heartbeat interval in milliseconds.")]
Liveness = Annotated[int, typer.Option("--liveness", min=1,
                                       help="Missed heartbeats before a peer is declared dead.")]
DbUrl = Annotated[str, typer.Option("--db", help="SQLAlchemy database URL.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line on stderr and exit ``code``: users never see a traceback for their mistakes."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def failing(prefix: str = "") -> Iterator[None]:
    """The command boundary: a ZmqlabError inside the block ends the command with exit 1."""
    try:
        yield
    except ZmqlabError as exc:
        fail(f"{prefix}{exc}")


def build(factory: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A config (or node) from options; a ZmqlabError is a bad option: exit 2, as Typer's."""
    try:
        return factory(*args, **kwargs)
    except ZmqlabError as exc:
        fail(str(exc), 2)


def setup_logs(level: str, as_json: bool) -> None:
    if level.lower() not in logs.LEVELS:
        raise typer.BadParameter(f"must be one of {', '.join(logs.LEVELS)}", param_hint="--log-level")
    logs.setup(level, as_json)
