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
