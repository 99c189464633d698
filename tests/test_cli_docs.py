# Regenerate docs/cli.md after changing a command, an option or a help text:
#     .venv/bin/typer zmqlab.cli utils docs --name zmqlab --output docs/cli.md
"""The committed CLI reference (docs/cli.md) is what Typer generates from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = ".venv/bin/typer zmqlab.cli utils docs --name zmqlab --output docs/cli.md"


def test_docs_cli_md_is_up_to_date(tmp_path: Path):
    generated = tmp_path / "cli.md"
    done = subprocess.run([sys.executable, "-m", "typer", "zmqlab.cli", "utils", "docs",
                           "--name", "zmqlab", "--output", str(generated)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert generated.read_text(encoding="utf-8") == committed, (
        f"docs/cli.md is out of date with the CLI; regenerate it with: {REGENERATE}")


def test_the_load_commands_default_endpoints_are_the_load_generators():
    # zmqlab.cli.load repeats the default so that ``zmqlab --help`` does not import loadgen.
    from zmqlab.cli.load import DEFAULT_ENDPOINTS
    from zmqlab.loadgen import DEFAULT_ENDPOINTS as LOADGEN_DEFAULT

    assert DEFAULT_ENDPOINTS == LOADGEN_DEFAULT
