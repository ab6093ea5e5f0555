"""`digitflow data ...`: the data checks, from the command line (no Prefect needed)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from flows.cli_common import DATASET, HOME, fail, one_line_errors
from storage import DigitflowError, checks, remote
from storage.config import resolve_home
from storage.catalog import resolve
from storage.download import expected_sha256
from storage.text import terminal

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check what the ingested data holds.")
MARK = {"pass": "✓", "warn": "!", "fail": "✗"}


def _files(home, spec) -> dict[str, tuple]:
    """``{split: (images path, SHA-256, labels path, SHA-256)}`` of the home's verified raw files."""
    raw = home.raw_for(spec.key)
    out = {}
    for split in spec.splits:
        pair = []
        for kind in ("images", "labels"):
            file = spec.file_for(split, kind)
            path = raw / file.idx_name
            if home.store is not None:  # a bucket home: its record, then the file (hashed as it is read)
                remote.pull_file(home.address(str(path)) + ".json")
                path = remote.pull_file(home.address(str(path)), file.idx_sha256)
            sha256 = expected_sha256(file, path) if path.is_file() else None
            if sha256 is None:
                raise DigitflowError(f"{terminal(spec.name)}: no verified {file.idx_name} in {terminal(home.url)}: "
                                     f"run `digitflow ingest --dataset {terminal(spec.name if spec.builtin else spec.source)}` first")
            pair += [path, sha256]
        out[split] = tuple(pair)
    return out


@app.command("check")
def check(home: Optional[str] = HOME, dataset: str = DATASET,
          json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check the ingested splits (rows, class counts, pixel statistics, duplicate, empty and shared
    images) exactly as ingest does; exit status 1 if a check fails."""
    with one_line_errors():
        spec = resolve(dataset)
        home = resolve_home(home)
        report = checks.check_files(spec, _files(home, spec))
    if json_out:
        typer.echo(json.dumps({"dataset": spec.name, "key": spec.key, "status": report.status,
                               "checks": checks.rows(report)}, indent=2))
    else:
        width = max(len(c.name) for c in report.checks)
        for c in report.checks:
            detail = f"  ({terminal(c.detail)})" if c.detail else ""
            typer.echo(f"{MARK[c.status]} {c.split:<6} {c.name:<{width}}  {c.value:>11}  expected {c.expectation}"
                       f"{detail}")
    if report.status == "fail":
        fail(report.failure())
