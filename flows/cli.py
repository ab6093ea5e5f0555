"""The ``digitflow`` command line."""

from __future__ import annotations

import atexit
import contextlib
import sys
from typing import List, Optional

import typer

import flows  # noqa: F401  (sets telemetry-off defaults before Prefect is imported)
from storage import DigitflowError
from storage.config import resolve_home

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="digitflow: the MNIST retraining pipeline (Prefect 3 + a pure-NumPy network).")

HOME = typer.Option(None, "--home", help="Root directory for all state [env DIGITFLOW_HOME; default ~/.digitflow].")
MIRRORS = typer.Option(None, "--mirror", help="Mirror base URL (http://, https://, file://); repeat to try several in order [env DIGITFLOW_MIRRORS].")
ROWS = typer.Option(10_000, "--rows-per-shard", min=1, help="Rows per Parquet shard.")
TIMEOUT = typer.Option(30.0, "--timeout", min=0.1, help="Seconds before a silent mirror counts as failed.")
RETRIES = typer.Option(3, "--retries", min=0, help="Retries of a download after transient failures (backoff 2 s, 4 s, 8 s, ...).")


_final_words: list[str] = []


@atexit.register  # registered before Prefect is imported, so it runs after Prefect's own exit
def _say_final_words() -> None:  # handlers: the error stays the last line on stderr
    for line in _final_words:
        print(line, file=sys.stderr, flush=True)


def fail(message: str) -> None:
    _final_words.append(f"digitflow: error: {message}")
    raise typer.Exit(1)


@contextlib.contextmanager
def one_line_errors():
    """Expected failures end in one line naming the file or value, and exit status 1."""
    try:
        yield
    except DigitflowError as e:
        fail(str(e))


@contextlib.contextmanager
def download_progress():
    """Progress bars for the downloads, drawn on stderr when it is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from tasks import progress as hook

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True) as view:
        def update(name, done, total):
            if name not in bars:
                bars[name] = view.add_task(name, total=total)
            view.update(bars[name], completed=done)

        hook.set_hook(update)
        try:
            yield
        finally:
            hook.set_hook(None)


def _ingest(home, mirrors, rows_per_shard, timeout, retries) -> dict:
    from flows.ingest import ingest as ingest_flow

    with one_line_errors():
        home = resolve_home(home)  # fail fast on an unwritable home, before Prefect starts
        with download_progress():
            return ingest_flow(home=str(home), mirrors=mirrors or None, rows_per_shard=rows_per_shard,
                               timeout=timeout, retries=retries)


@app.command()
def ingest(home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS,
           rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES) -> None:
    """Download, verify and shard MNIST into <home>/data/mnist/{train,test}."""
    refs = _ingest(home, mirror, rows_per_shard, timeout, retries)
    for split, ref in refs.items():
        typer.echo(f"{split}: {ref['rows']} rows in {ref['shards']} shards, manifest {ref['manifest']} "
                   f"(sha256 {ref['sha256'][:16]}…)")


@app.command()
def run(home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS,
        rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES) -> None:
    """Run the whole pipeline."""
    ingest(home=home, mirror=mirror, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
