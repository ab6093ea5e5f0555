"""Operating what runs: the HTTP API (`digitflow api`), the drift monitor, alerts, and the local
Prefect server (`digitflow server status|stop|logs`)."""

from __future__ import annotations

import os
from typing import Optional

import typer

from flows import server
from flows.cli_common import DATASET, HOME, MODEL_NAME, one_line_errors, option, start
from flows.cli_schedule import check_cron
from serving.app import ApiSettings
from storage import DigitflowError
from storage.config import resolve_home
from storage.catalog import dataset_and_model
from storage.settings import checked, env_name, settings as environment
from storage.text import count, terminal


def api(host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only)."),
        port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
        model: str = option(ApiSettings, "model"),
        home: Optional[str] = HOME, dataset: str = DATASET, model_name: Optional[str] = MODEL_NAME,
        workers: int = typer.Option(1, "--workers", min=1, max=64, help="Worker processes."),
        token: Optional[str] = option(ApiSettings, "token", envvar=env_name("api_token"), show_envvar=True),
        max_body: int = option(ApiSettings, "max_body"),
        max_pixels: int = option(ApiSettings, "max_pixels"),
        max_images: int = option(ApiSettings, "max_images"),
        max_request_pixels: int = option(ApiSettings, "max_request_pixels"),
        poll: float = option(ApiSettings, "poll"),
        log_level: str = typer.Option("info", "--log-level", help="info: one line per request; warning: swaps and errors only."),
        ) -> None:
    """Serve the champion over HTTP (predictions, metrics, a drawing page).

    POST /predict, GET /model /health /ready /metrics, and a drawing page at /; a promotion is
    picked up within --poll seconds, verified before the swap."""
    from serving.app import check_listen, is_loopback, serve as serve_api

    with one_line_errors():
        _, model_name = dataset_and_model(dataset, model_name)
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            raise DigitflowError(f"--log-level {log_level!r}: use info, warning or error")
        if token is None and environment().api_token is not None:  # (the variable's name in any case, as Settings reads it)
            token = environment().api_token.get_secret_value()
        settings = checked(ApiSettings, home=str(resolve_home(home, existing=True)), model_name=model_name, model=model, token=token,
                           max_body=max_body, max_pixels=max_pixels, max_images=max_images,
                           max_request_pixels=max_request_pixels, poll=float(poll))
        check_listen(host, port, workers)
        if not token and not is_loopback(host):
            typer.echo(f"digitflow api: warning: listening on {host} without a token: anyone who can reach this "
                       "machine can use the API (set DIGITFLOW_API_TOKEN)", err=True)
        typer.echo(f"digitflow api: {model_name} {model} from {settings.home} on http://{f'[{host}]' if ':' in host else host}:{port}/ "
                   f"({count(workers, 'worker')}{', token required' if token else ''})", err=True)
        serve_api(settings, host=host, port=port, workers=workers, log_level=log_level)


alerts_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Alerts as Prefect automations.")


@alerts_app.command("install")
def alerts_install(webhook: str = typer.Option(..., "--webhook", help="URL that receives the POSTed alerts."),
                   block_name: str = typer.Option("digitflow-alerts", "--block-name")) -> None:
    """Create Prefect automations on the server (PREFECT_API_URL): a failed run or a gate
    rejection sends a notification to WEBHOOK, even when the run's own process is gone."""
    from flows.alerts import install_automations, where

    with one_line_errors():
        start(False)
        names = install_automations(webhook, block_name)
    for name in names:
        typer.echo(f"automation {name!r} → {where(webhook)}")


server_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="The local Prefect server digitflow starts when PREFECT_API_URL is not set.")


@server_app.command("status")
def server_status() -> None:
    """Which Prefect server commands use, and whether it answers."""
    if os.environ.get("PREFECT_API_URL"):
        url = os.environ["PREFECT_API_URL"]
        typer.echo(f"PREFECT_API_URL={url}: {'answering' if server.healthy(url) else 'not answering'} "
                   "(digitflow starts no server of its own)")
        return
    url, pid = server.api_url(), server.running_pid()
    state = "answering" if server.healthy(url) else "not answering"
    typer.echo(f"local server {url}: {state}" + (f", pid {pid}" if pid else "")
               + f"; dashboard {server.ui_url()}; log {server.state_dir() / 'server.log'}")
    if state != "answering":
        raise typer.Exit(1)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local server (the next command that needs one starts it again)."""
    typer.echo("local server stopped" if server.stop() else "no local server was running")


@server_app.command("logs")
def server_logs(lines: int = typer.Option(40, "--lines", "-n", min=1, max=100_000, help="How many of the last lines.")) -> None:
    """The last lines of the local server's log."""
    import collections

    log = server.state_dir() / "server.log"
    if not (log.exists() or log.is_symlink()):
        typer.echo(f"no log yet ({log})")
        return
    fd = server.open_log(os.O_RDONLY)
    if fd is None:
        typer.echo(f"{log} is not a regular file: not read")
        return
    with os.fdopen(fd, "rb") as f:
        for line in collections.deque(f, maxlen=lines):
            typer.echo(terminal(line.decode("utf-8", "replace").rstrip("\n")))


def monitor(api: str = typer.Option("http://127.0.0.1:8000", "--api", help="Base URL of a running `digitflow api` "
                                    "(its token from $DIGITFLOW_API_TOKEN)."),
            threshold: float = typer.Option(0.25, "--threshold", min=0.0001, max=100.0,
                                            help="PSI above which a statistic counts as drifted."),
            min_images: int = typer.Option(100, "--min-images", min=1, max=1_000_000,
                                           help="Images the API's window needs before anything is judged."),
            cron: Optional[str] = typer.Option(None, "--cron", help="Serve the monitor on this schedule (UTC) "
                                               "instead of running it once."),
            json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON.")) -> None:
    """Compare what a running API was asked with its version's test split.

    When the inputs drifted, emits `digitflow.drift.detected` (for `deploy --retrain-on-drift`)."""
    from flows.monitor import check_api_url, monitor as monitor_flow

    with one_line_errors():
        if cron is not None:
            check_cron(cron)
        check_api_url(api)
        start(False)
        if cron is not None:
            monitor_flow.serve(name="monitor", cron=cron, parameters={"api_url": api, "threshold": threshold,
                                                                        "min_images": min_images},
                               tags=["digitflow"])
            return
        summary = monitor_flow(api_url=api, threshold=threshold, min_images=min_images)
    if json_out:
        typer.echo(summary.model_dump_json())
        return
    psi = ", ".join(f"{k} {v:.3f}" for k, v in summary.psi.items() if v is not None) or "not compared"
    typer.echo(terminal(f"{summary.model} v{summary.version}: {summary.window_images} served images; "
                        f"{'DRIFTED: ' + ', '.join(summary.drifted) if summary.drifted else 'no drift'} "
                        f"(PSI {psi})"))
