"""The ``zmqlab`` command line: parse options, build configs, call the library.

Commands are grouped by topic (``nodes``, ``client``, ``load``, ``dead``) and added here, in
the order ``zmqlab --help`` lists them. Errors a user can cause (bad options, unreachable
endpoints, a database that cannot be opened) end in one line on stderr and exit code 1 (2 for
bad options), never a traceback.
"""

from __future__ import annotations

import typer

from zmqlab.cli import client, dead, load, nodes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="zmqlab: producers -> partitioned ZeroMQ broker -> consumers -> SQL.")

for command in (nodes.broker, nodes.producer, nodes.consumer, nodes.up,
                client.send, client.status, client.assign, load.load, load.demo):
    app.command()(command)
app.command(name="watch")(client.watch_broker)
app.add_typer(dead.app, name="dead")


def main() -> None:
    app()
