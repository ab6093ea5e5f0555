"""What every `digitflow` command shares: options, one-line errors, quiet expected failures, the
hyperparameter flags, and how a command reaches its home and its Prefect server."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import traceback
from typing import Literal, Optional

import typer

from flows import console, interrupt, server
from storage import DigitflowError
from storage.atomic import is_disk_error
from storage.config import IngestSettings, resolve_home
from storage.settings import env_name, flag_help
from storage.text import terminal
from storage.registry import APPROVAL_BOUNDS, APPROVAL_MODES, APPROVAL_TIMEOUT, DEFAULT_NAME, DEFAULT_TOLERANCE, GATE_BOUNDS

HOME = typer.Option(None, "--home", help="Root directory for all state (env DIGITFLOW_HOME; default ~/.digitflow).")
MIRRORS = typer.Option(None, "--mirror", help="Mirror base URL (http://, https://, file://); repeat to try several in order (env DIGITFLOW_MIRRORS).")


def option(model, name: str, **extra):
    """The flag of field ``name`` of a settings ``model``: its default, and its description and
    bounds as help (declared once, in the model)."""
    return typer.Option(model.model_fields[name].default, "--" + name.replace("_", "-"),
                        help=flag_help(model, name), **extra)


ROWS, TIMEOUT, RETRIES, DEADLINE = (option(IngestSettings, name) for name in ("rows_per_shard", "timeout", "retries",
                                                                                "deadline"))
PRESET = typer.Option("default", "--preset", help="Hyperparameter preset: default, best, balanced or fast (all tuned on MNIST).")
WEBHOOK = typer.Option(None, "--webhook", help="POST failed runs and gate rejections to this URL (never recorded "
                       "in the run's parameters), or env:VARIABLE / secret:PREFECT_SECRET_BLOCK holding it "
                       "(default: env DIGITFLOW_WEBHOOK_URL).")
MODEL_NAME = typer.Option(None, "--model-name", help=f"Registry name of the model (default: <dataset>-mlp, {DEFAULT_NAME} for MNIST).")
DATASET = typer.Option("mnist", "--dataset", help="mnist, fashion-mnist, or the path of a dataset spec file (.toml/.json).")
ALLOW_UNPINNED = typer.Option(False, "--allow-unpinned", help="Accept dataset files whose spec has no checksum (the provenance records the hash seen).")
TOLERANCE = typer.Option(DEFAULT_TOLERANCE, "--tolerance", min=GATE_BOUNDS[0], max=GATE_BOUNDS[1], help="Promote if accuracy ≥ champion's minus this.")
FLOOR = typer.Option(None, "--floor", min=GATE_BOUNDS[0], max=GATE_BOUNDS[1],
                     help="Never promote below this test accuracy (default: the dataset's: MNIST 0.97, "
                          "Fashion-MNIST 0.85, a spec's floor, else 0).")

ApprovalMode = Literal[APPROVAL_MODES]  # type: ignore[valid-type]
APPROVAL = typer.Option("none", "--approval", help="required: a version the gate would promote waits for a person "
                        "(the dashboard's Resume form, or `digitflow models approve N` / `models reject N`).")
APPROVAL_WAIT = typer.Option(APPROVAL_TIMEOUT, "--approval-timeout", min=APPROVAL_BOUNDS[0], max=APPROVAL_BOUNDS[1],
                             help="Seconds a version waits for approval; no answer is a rejection.")


_final_words: list[str] = []


@atexit.register  # registered before Prefect is imported, so it runs after Prefect's own exit
def _say_final_words() -> None:  # handlers: the error stays the last line on stderr
    for line in _final_words:
        print(line, file=sys.stderr, flush=True)


def fail(message: str) -> None:
    from storage.text import terminal

    # One line per line of the message (a spec's mistakes), none able to act on the terminal.
    _final_words.append("digitflow: error: " + "\n".join(map(terminal, str(message).split("\n"))))
    raise typer.Exit(1)


def verbose() -> bool:
    """``--verbose`` (anywhere on the command line) or ``DIGITFLOW_DEBUG=1``: show tracebacks."""
    from storage.settings import debug

    return debug()


def is_expected(exc: BaseException | None) -> bool:
    """An expected failure (bad input, a damaged file, no mirror, a full disk), as opposed to a bug."""
    import nn

    return isinstance(exc, (DigitflowError, nn.ModelFormatError)) or is_disk_error(exc)


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, DigitflowError):
        where = exc.filename or os.environ.get("DIGITFLOW_HOME") or "the home directory"  # (raw: an error path)
        return f"{where}: {exc.strerror or exc} (nothing partial was left in place)"
    return str(exc)


def quiet_expected_failures() -> None:
    """Prefect logs a failed task or flow with its traceback; for expected failures, keep the
    one-line message and drop the traceback (unless verbose). Done where records are made, so
    it holds for every handler, whenever Prefect configures its logging."""
    if verbose():
        return
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        if record.exc_info and is_expected(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return record

    logging.setLogRecordFactory(factory)


@contextlib.contextmanager
def one_line_errors():
    """Expected failures end in one line naming the file or value, and exit status 1
    (with ``--verbose``, after their traceback). Anything else is a bug: its traceback shows."""
    try:
        yield
    except Exception as e:
        if not is_expected(e):
            raise
        if verbose():
            traceback.print_exc()
        fail(describe(e))


# ---- what several commands share -----------------------------------------------------------

def hp_options(f):
    """Add one flag per hyperparameter (each overrides the preset) to a command, which receives
    them as ``hp``, an ``Overrides``; the flags, their syntax and help come from the contract
    (flows/contract.py), like the sweep grid."""
    import functools
    import inspect

    from flows.contract import cli_options, parse_overrides

    extra = cli_options()
    sig = inspect.signature(f)
    params = [p for p in sig.parameters.values() if p.name != "hp"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                 default=typer.Option(None, flag, metavar=metavar, help=help_))
               for name, flag, metavar, help_ in extra]

    @functools.wraps(f)
    def wrapper(**kwargs):
        with one_line_errors():
            hp = parse_overrides({name: text for name, *_ in extra if (text := kwargs.pop(name)) is not None})
        return f(hp=hp, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def start(home=None, runs: str | None = None):
    """Resolve the home (fails fast, before Prefect starts); then the Prefect server: the one in
    PREFECT_API_URL, else the local one (started on first use, flows/server.py), else with
    DIGITFLOW_EPHEMERAL=1 Prefect's temporary one, kept out of reach of the terminal's Ctrl-C.
    ``runs``: the module of the flows the command runs, imported with Prefect."""
    resolved = resolve_home(home) if home is not False else None
    where = f"home {terminal(str(resolved))} · " if resolved is not None else ""
    print(f"digitflow: {where}{server.describe()}", file=sys.stderr, flush=True)  # before Prefect's import
    server.use()
    import_prefect(runs)
    interrupt.detach_ephemeral_server()
    console.setup(resolved)  # Prefect's log to the dashboard and <home>/logs; one line per step on the terminal
    return str(resolved) if resolved is not None else None


# What Prefect imports at a process's first flow run rather than at ``import prefect``.
PREFECT_AT_FIRST_RUN = ("fastapi.encoders", "prefect.task_engine")


def import_prefect(runs: str | None = None) -> None:
    """Import Prefect, what it imports at the first flow run, and ``runs`` (the module of the
    command's flows) with the cyclic garbage collector paused; in a fresh process, then freeze
    what they made. These imports build ~200,000 tracked objects and no garbage; the collections
    they would trigger, and those that would walk their objects again later, cost ~0.3 s of a
    command's start."""
    import gc
    import importlib

    fresh, collecting = "prefect" not in sys.modules, gc.isenabled()
    gc.disable()
    try:
        for module in ("prefect", *PREFECT_AT_FIRST_RUN, *([runs] if runs else [])):
            importlib.import_module(module)
    finally:
        if collecting:
            gc.enable()
    if fresh:
        gc.freeze()  # modules, classes and settings live as long as the process: never scanned again


def mirrors_param(mirror: list[str] | None, here: bool = True) -> list[str] | None:
    """The mirrors as a flow parameter, unless one carries credentials (user:secret@): flow
    parameters are recorded by Prefect, so those travel in this process's environment instead
    (``here``: the flow runs are this process or its children; a deployment's are not)."""
    from storage.download import redact

    if mirror and any(redact(m) != m for m in mirror):
        if not here:
            raise DigitflowError("--mirror with credentials cannot be recorded in a deployment (its parameters are "
                                 "shown in the dashboard): set DIGITFLOW_MIRRORS on the workers instead")
        os.environ[env_name("mirrors")] = " ".join(mirror)
        return None
    return list(mirror) if mirror else None


def webhook_param(webhook: str | None, here: bool = True) -> str | None:
    """The flows' ``webhook`` parameter for ``--webhook``: ``env:NAME``/``secret:NAME`` as they
    are; a URL (often a secret itself) reaches this process's flow runs through its environment,
    never a parameter, and a deployment (``here=False``) refuses it in one line."""
    from urllib.parse import urlsplit

    from flows.alerts import ENV, REFERENCE, check_reference

    if webhook is None or REFERENCE.fullmatch(webhook):
        return webhook
    if not here:
        check_reference(webhook)
    if urlsplit(webhook).scheme not in ("http", "https"):
        raise DigitflowError("--webhook must be an http(s) URL, env:VARIABLE or secret:PREFECT_SECRET_BLOCK")
    os.environ[ENV] = webhook
    return None
