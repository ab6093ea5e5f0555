"""What a person sees on the terminal while a command runs flows: a few lines, not Prefect's log.

By default Prefect's console log is off: every log line still goes to the dashboard (Prefect's
API log handler) and to the home's log file, ``<home>/logs/digitflow.log`` (commands without a
home: ``<PREFECT_HOME>/digitflow.log``); ``--verbose`` shows them on the terminal as well. In their place, one line per finished step:

    ✓ ingest-mnist (10000 rows/shard)   13 steps, 13 cached        (a subflow: its tasks counted)
    ✓ train [128], 3 epochs            cached                      (a task of the run itself)
    ✗ download train-images-idx3-ubyte.gz: failed                   (then the one error line)

warnings of our own and of the runs (``! train …: checkpoint discarded``), progress bars while
bytes move or batches pass (``progress_display``), the dashboard link
(flows/server.py) and the command's outcome. A warm ``digitflow run`` prints six lines.
"""

from __future__ import annotations

import contextlib
import logging
import re

from storage.text import count

LOG_NAME = "digitflow.log"
_STATE = re.compile(r"^Finished in state (\w+)")


def log_path(home=None):
    """``<home>/logs/digitflow.log``, or ``<PREFECT_HOME>/digitflow.log`` without a home."""
    from pathlib import Path

    from flows.server import prefect_home

    return Path(home) / "logs" / LOG_NAME if home is not None else prefect_home() / LOG_NAME


def quiet() -> bool:
    from flows.cli_common import verbose

    return not verbose()


def setup(home=None) -> None:
    """After Prefect configured its logging: its console handler off (unless verbose), every
    record into the log file (``log_path(home)``), finished steps summarized on stderr. Idempotent."""
    import prefect  # noqa: F401  (configures Prefect's logging first: dictConfig replaces handlers)

    root = logging.getLogger()
    if any(isinstance(h, Steps) for h in root.handlers):
        return
    path = log_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    from prefect.logging.formatters import PrefectFormatter

    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(PrefectFormatter(  # the lines Prefect's console would have shown, dated
        format="%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt="%(asctime)s.%(msecs)03d | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s.%(msecs)03d | %(levelname)-7s | Task run %(task_run_name)r - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S"))
    to_file.setLevel(logging.INFO)
    root.addHandler(to_file)
    if not quiet():
        return
    for handler in _prefect_console_handlers():
        handler.setLevel(logging.CRITICAL + 1)
    root.addHandler(Steps())
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # their records reach the root only if they propagate
        logging.getLogger(name).propagate = True


class Steps(logging.Handler):
    """Turns Prefect's "Finished in state …" records into one line per step."""

    def __init__(self):
        from tasks.common import TOLD_BY_THE_OUTCOME

        super().__init__(logging.INFO)
        self.told_by_the_outcome = TOLD_BY_THE_OUTCOME
        self.subflows: dict[str, list[int]] = {}  # subflow run name → [tasks, cached]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        flow_name = getattr(record, "flow_run_name", None)
        task_name = getattr(record, "task_run_name", None)
        if record.levelno == logging.WARNING and record.name.startswith(("prefect.flow_runs", "prefect.task_runs",
                                                                         "digitflow")):
            if getattr(record, self.told_by_the_outcome, False):
                return
            self.say(f"{task_name or flow_name or 'digitflow'}: {message}", "", False, mark="[yellow]![/yellow]")
            return
        if message.startswith("Beginning subflow run"):
            self.subflows[flow_name] = [0, 0]
            return
        state = _STATE.match(message)
        if state is None:
            return
        kind = state.group(1)
        failed = kind in ("Failed", "Crashed", "TimedOut")
        if task_name is not None:
            counts = self.subflows.get(flow_name)
            if counts is not None and not failed:
                counts[0] += 1
                counts[1] += kind == "Cached"
                return
            self.say(task_name, "failed" if failed else "cached" if kind == "Cached" else "", failed)
        elif flow_name in self.subflows:
            tasks, cached = self.subflows.pop(flow_name)
            detail = count(tasks, "step") + (f", {cached} cached" if cached else "")
            self.say(flow_name, "failed" if failed else detail, failed)

    def say(self, name: str, detail: str, failed: bool, mark: str = "[green]✓[/green]") -> None:
        from rich.console import Console
        from rich.markup import escape

        from storage.text import terminal

        text = escape(terminal(name)) + (f" [dim]{escape(detail)}[/dim]" if detail and not failed else "")
        line = f"[red]✗[/red] {text}: failed" if failed else f"{mark} {text}"
        console = _console or Console(stderr=True, highlight=False)
        console.print(line, highlight=False)


_console = None  # the live progress display's console, while one is shown (lines print above it)


@contextlib.contextmanager
def progress_display():
    """Progress bars on stderr when it is a terminal: downloads and bucket transfers (MB, MB/s)
    and training (epochs); step lines print above them."""
    global _console
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeElapsedColumn, TransferSpeedColumn)

    from tasks import progress as hook

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    bytes_view = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=console, transient=True)
    epochs_view = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                           console=console, transient=True)
    bars: dict[str, tuple] = {}
    from rich.console import Group
    from rich.live import Live

    with Live(Group(bytes_view, epochs_view), console=console, transient=True, refresh_per_second=8):
        def update(name, done, total, text=None):
            view = epochs_view if name == "train" else bytes_view
            if name not in bars:
                bars[name] = (view, view.add_task("training" if name == "train" else name, total=total))
            view.update(bars[name][1], completed=done, **({"description": text} if text else {}))
            if view is bytes_view and total and done >= total:  # a finished transfer leaves the screen
                view.remove_task(bars.pop(name)[1])

        hook.set_hook(update)
        _console = console
        # With --verbose, Prefect's log lines go through the same console, so they print above
        # the bars instead of tearing through them.
        handlers = [] if quiet() else _prefect_console_handlers()
        saved = {h: h.console for h in handlers}
        for h in handlers:
            h.console = console
        try:
            yield
        finally:
            hook.set_hook(None)
            _console = None
            for h, original in saved.items():
                h.console = original


def _prefect_console_handlers() -> list:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    return list({h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)})
