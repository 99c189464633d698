"""Light imports: a producer, a pipelined client or a broker does not load the database stack.

Each import runs in a fresh interpreter, because this test process has imported everything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("sqlalchemy", "sqlmodel", "rich", "typer")


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("statement", [
    "import zmqlab",
    "import zmqlab.protocol",
    "import zmqlab.producer",
    "import zmqlab.pipelined",
    "import zmqlab.broker",
    "from zmqlab import Producer, Broker",
])
def test_a_client_or_broker_import_does_not_load_the_database_stack(statement):
    done = run(f"{statement}\nimport sys\n"
               f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{statement} imported {done.stdout.strip()}"


def test_the_consumer_and_every_public_name_still_import_from_the_package():
    done = run("import sys\n"
               "from zmqlab import Consumer\n"
               "assert Consumer.__module__ == 'zmqlab.consumer'\n"
               "assert 'sqlalchemy' in sys.modules\n"
               "import zmqlab\n"
               "missing = [n for n in zmqlab.__all__ if getattr(zmqlab, n, None) is None]\n"
               "assert not missing, missing\n"
               "assert set(zmqlab.__all__) <= set(dir(zmqlab))\n"
               "print('ok')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_an_unknown_name_is_an_attribute_error():
    import zmqlab

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        zmqlab.Nope  # noqa: B018
