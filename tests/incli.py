"""The ``digitflow`` CLI run in the test's own process (typer's CliRunner), for tests where a
fresh process is not the point: commands that start no Prefect run (``models``, ``predict``,
``data``). A subprocess costs ~1 s of interpreter start and imports here, this ~0.05 s. What a
process gives that this does not — signals, exit at the interpreter's end, the ``digitflow``
entry point, imports kept lazy — is tested with subprocesses elsewhere."""

from __future__ import annotations

import subprocess

# Commands whose code never starts a flow run or points this process at a Prefect server.
IN_PROCESS = {"models", "predict", "data"}
NOT_IN_PROCESS = {("models", "approve"), ("models", "reject")}  # they set PREFECT_API_URL for the process


def suitable(args: tuple[str, ...]) -> bool:
    return bool(args) and args[0] in IN_PROCESS and tuple(args[:2]) not in NOT_IN_PROCESS and "--verbose" not in args


def digitflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``digitflow ARGS`` here; stdout, stderr and the exit status as a subprocess would give
    them (the final error line included, which the CLI prints at exit)."""
    from typer.testing import CliRunner

    import flows.cli
    from flows import cli_common

    cli_common._final_words.clear()
    result = CliRunner().invoke(flows.cli.app, list(args), prog_name="digitflow",
                                env={"COLUMNS": "200", **(env or {})})
    final = "".join(line + "\n" for line in cli_common._final_words)
    cli_common._final_words.clear()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["digitflow", *args], result.exit_code, result.stdout, result.stderr + final)
