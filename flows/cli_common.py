"""What every `digitflow` command shares: options and one-line errors."""

from __future__ import annotations

import atexit
import contextlib
import sys

import typer

from storage import DigitflowError

HOME = typer.Option(None, "--home", help="Root directory for all state (env DIGITFLOW_HOME; default ~/.digitflow).")
MIRRORS = typer.Option(None, "--mirror", help="Mirror base URL (http://, https://, file://); repeat to try several in order (env DIGITFLOW_MIRRORS).")
ROWS = typer.Option(10_000, "--rows-per-shard", min=1, help="Rows per Parquet shard.")
TIMEOUT = typer.Option(30.0, "--timeout", min=0.1, help="Seconds before a silent mirror counts as failed.")
RETRIES = typer.Option(3, "--retries", min=0, help="Retries of a download after transient failures (backoff 2 s, 4 s, 8 s, ...).")
PRESET = typer.Option("default", "--preset", help="Hyperparameter preset: default, best or fast.")
WEBHOOK = typer.Option(None, "--webhook", help="POST failed runs and gate rejections here (env DIGITFLOW_WEBHOOK_URL).")
MODEL_NAME = typer.Option("mnist-mlp", "--model-name", help="Registry name of the model.")

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


