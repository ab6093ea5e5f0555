"""The layering is a contract (pyproject.toml, [tool.importlinter]): flows > tasks | serving > publishing >
storage > nn, nn/ imports nothing of ours and no Prefect, storage/, publishing/ and serving/ import no Prefect, and the built-in
datasets sit between what a dataset is and the catalog that lists them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "5 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_the_readme_lists_every_environment_variable_as_settings_declares_it():
    from storage.settings import env_table

    assert env_table() in (REPO / "README.md").read_text()


def test_every_commands_help_flows_as_paragraphs_and_shows_flags_as_flags():
    """A docstring's line breaks never reach --help mid-sentence; a boolean flag takes no value."""
    import re

    import typer

    from flows.cli import _flags_as_flags, app

    cli = typer.main.get_command(app)
    _flags_as_flags(cli)
    seen = []

    def walk(command, path):
        seen.append(path)
        assert command.help is None or not re.search(r"(?<!\n)\n(?!\n)", command.help), (path, command.help)
        assert all(p.metavar == " " for p in command.params if getattr(p, "is_flag", False)), path
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(cli, "digitflow")
    assert {"digitflow models approve", "digitflow data check", "digitflow alerts install", "digitflow api"} <= set(seen)
