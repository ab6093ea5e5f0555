"""The ``digitflow`` command line: the pipeline's commands here (ingest, run, train, evaluate,
publish, predict, sweep); the others by purpose in ``cli_schedule`` (serve, deploy),
``cli_operate`` (api, monitor, alerts, server), ``cli_models`` (models …) and ``cli_data``
(data …), registered at the end of this file."""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from typing import List, Optional

import typer

import flows  # noqa: F401  (sets telemetry-off defaults before Prefect is imported)
from flows import cli_data, cli_models, cli_operate, cli_schedule, interrupt, server
from flows.console import progress_display
from flows.cli_common import (ALLOW_UNPINNED, APPROVAL, APPROVAL_WAIT, DATASET, DEADLINE, FLOOR, HOME, MIRRORS,
                              MODEL_NAME, PRESET, RETRIES, ROWS, TIMEOUT, TOLERANCE, WEBHOOK, ApprovalMode, fail,
                              hp_options, mirrors_param, one_line_errors, quiet_expected_failures, start,
                              webhook_param)
from flows.contract import Overrides, hyperparameters, overrides_dict, parse_grid
from storage import DigitflowError
from storage.config import IngestSettings, resolve_home
from storage.catalog import dataset_and_model
from storage.datasets import class_names
from storage.settings import checked, env_name, misspelt, settings
from storage.text import count, terminal

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="digitflow: the MNIST retraining pipeline (Prefect 3 + a pure-NumPy network).")


@app.command()
def ingest(home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
           allow_unpinned: bool = ALLOW_UNPINNED,
           rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES,
           deadline: Optional[float] = DEADLINE) -> None:
    """Download, verify and shard a dataset (MNIST by default).

    Writes <home>/data/<dataset>/<split>, repairing whatever is damaged."""
    with one_line_errors():
        dataset_and_model(dataset, None, allow_unpinned)  # a bad spec: one line per mistake, before any download
        checked(IngestSettings, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries, deadline=deadline)
        home = start(home, runs="flows.ingest")
        from flows.ingest import ingest as ingest_flow
        with progress_display():
            refs = ingest_flow(home=home, mirrors=mirrors_param(mirror), rows_per_shard=rows_per_shard, timeout=timeout,
                               retries=retries, deadline=deadline, dataset=dataset, allow_unpinned=allow_unpinned)
    for ref in refs.splits:
        typer.echo(f"{ref.split}: {ref.rows} rows in {count(ref.shards, 'shard')}, manifest {ref.manifest} (sha256 {ref.sha256[:16]}…)")


@app.command()
@hp_options
def run(home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
        allow_unpinned: bool = ALLOW_UNPINNED, preset: str = PRESET, model_name: Optional[str] = MODEL_NAME,
        tolerance: float = TOLERANCE, floor: Optional[float] = FLOOR,
        require_promotion: bool = typer.Option(False, "--require-promotion", help="Exit 1 unless the new version is champion."),
        json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
        webhook: Optional[str] = WEBHOOK, approval: ApprovalMode = APPROVAL, approval_timeout: float = APPROVAL_WAIT,
        rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES,
        deadline: Optional[float] = DEADLINE, hp: Overrides = None) -> None:
    """Run the whole pipeline: ingest → train → evaluate → publish → promotion gate."""
    with one_line_errors():
        spec, _ = dataset_and_model(dataset, model_name, allow_unpinned)  # invalid values fail before any work
        hyperparameters(preset, hp, spec)
        checked(IngestSettings, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries, deadline=deadline)
        home = start(home, runs="flows.pipeline")
        from flows.pipeline import retrain
        with progress_display():
            summary = retrain(home=home, mirrors=mirrors_param(mirror), dataset=dataset, allow_unpinned=allow_unpinned,
                              preset=preset, model_name=model_name, **overrides_dict(hp),
                              tolerance=tolerance, floor=floor, rows_per_shard=rows_per_shard, timeout=timeout,
                              retries=retries, deadline=deadline, webhook=webhook_param(webhook), approval=approval,
                              approval_timeout=approval_timeout)
    if json_out:
        typer.echo(summary.model_dump_json())
    else:
        what = "published now" if summary.created else "published before"
        typer.echo(f"{summary.name} v{summary.version} ({what}) test accuracy {summary.test_accuracy:.4f}: "
                   f"{summary.status} — {summary.reason}")
        typer.echo(f"  {summary.path}")
    if require_promotion and summary.champion != summary.version:
        fail(f"v{summary.version} was not promoted: {summary.reason}")


@app.command()
@hp_options
def train(home: Optional[str] = HOME, dataset: str = DATASET, preset: str = PRESET, hp: Overrides = None) -> None:
    """Train on the ingested shards (run `digitflow ingest` first).

    Prints the trained model's folder, which `digitflow evaluate --model PATH` and
    `digitflow publish PATH` accept."""

    with one_line_errors():
        spec, _ = dataset_and_model(dataset, None)
        hyperparameters(preset, hp, spec)
        home = start(home, runs="flows.pipeline")
        from flows.pipeline import train_only
        _require_split(home, "train", spec.key)
        with progress_display():
            result = train_only(home=home, dataset=dataset, preset=preset, **overrides_dict(hp))
    last = result.history[-1]
    typer.echo(f"trained {result.dir} (weights {result.weights_sha256[:16]}…): "
               f"val accuracy {last.get('val_accuracy', float('nan')):.4f} after {count(len(result.history), 'epoch')}")


def _require_split(home: str, split: str, dataset: str) -> None:
    """No data yet: one line now, before Prefect starts (a remote home's manifest is fetched)."""
    from tasks.ingest import manifest_ref

    h = resolve_home(home)
    manifest_ref(h.address(h.split(split, dataset)))


def _model_ref(model: str, home: str, model_name: str):
    """(verified model reference, label) for a VERSION, an alias or a trained model folder."""
    from pathlib import Path

    from tasks.model import trained_ref
    from tasks.refs import TrainedModel

    if "/" in model or Path(model).is_dir():
        return trained_ref(model), model if "://" in model else str(Path(model))
    registry = resolve_home(home).registry(model_name)
    version = registry.resolve(model)
    registry.load_model(version)  # a changed or damaged version: one line now, before Prefect starts
    return (TrainedModel(dir=str(registry.path(version)), weights_sha256=registry.metadata(version).weights_sha256),
            f"{model_name} v{version}")


@app.command()
def evaluate(model: str = typer.Option("champion", "--model", help="VERSION, alias (latest, champion) or a trained model folder."),
             home: Optional[str] = HOME, dataset: str = DATASET, model_name: Optional[str] = MODEL_NAME,
             json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON.")) -> None:
    """Evaluate a published version, or a trained model folder, on the dataset's test split."""
    with one_line_errors():
        spec, model_name = dataset_and_model(dataset, model_name)
        home = start(home, runs="flows.pipeline")
        from flows.pipeline import evaluate_model
        ref, label = _model_ref(model, home, model_name)
        _require_split(home, "test", spec.key)
        metrics = evaluate_model(ref, home=home, dataset=dataset)
    if json_out:
        version = label.rpartition(" v")[2]
        typer.echo(json.dumps({"version": int(version) if version.isdigit() else None, "model": label,
                               **metrics.model_dump()}))
        return
    typer.echo(f"{label}: test accuracy {metrics.test_accuracy:.4f}, loss {metrics.test_loss:.4f}, "
               f"macro F1 {metrics.macro_f1:.4f}, {metrics.inference_images_per_second:,.0f} images/s")
    names = class_names(spec.classes)
    for c in metrics.per_class:
        typer.echo(f"  {c['class']}{' ' + terminal(names[c['class']]) if names else ''}: precision {c['precision']:.4f} recall {c['recall']:.4f} f1 {c['f1']:.4f}")


@app.command()
def publish(folder: str = typer.Argument(..., help="A trained model folder, as `digitflow train` prints it."),
            home: Optional[str] = HOME, dataset: str = DATASET, model_name: Optional[str] = MODEL_NAME,
            tolerance: float = TOLERANCE,
            floor: Optional[float] = FLOOR, webhook: Optional[str] = WEBHOOK, approval: ApprovalMode = APPROVAL,
            approval_timeout: float = APPROVAL_WAIT,
            json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON.")) -> None:
    """Evaluate a trained model on the test split, publish it as a version and put it through the gate."""
    from tasks.model import trained_ref

    with one_line_errors():
        spec, model_name = dataset_and_model(dataset, model_name)
        ref = trained_ref(folder)
        home = start(home, runs="flows.pipeline")
        from flows.pipeline import publish_trained
        outcome = publish_trained(ref, home=home, dataset=dataset, model_name=model_name, tolerance=tolerance,
                                  floor=floor, webhook=webhook_param(webhook), approval=approval,
                                  approval_timeout=approval_timeout)
    if json_out:
        typer.echo(outcome.model_dump_json())
        return
    typer.echo(f"{outcome.name} v{outcome.version} test accuracy {outcome.test_accuracy:.4f}: "
               f"{outcome.status} — {outcome.reason}")
    typer.echo(f"  {outcome.path}")


@app.command()
def predict(images: List[str] = typer.Argument(..., help="PNG/JPEG/... files of digits, or IDX image files."),
            model: str = typer.Option("champion", "--model", help="VERSION or alias (latest, champion)."),
            home: Optional[str] = HOME, dataset: str = DATASET, model_name: Optional[str] = MODEL_NAME,
            json_out: bool = typer.Option(False, "--json", help="Print [{path, digit, probability}, ...] (and class).")) -> None:
    """Predict the classes of image files (MNIST: digits).

    PNG/JPEG images are prepared the way MNIST was (invert, crop, 20×20 box, centered); another
    dataset takes IDX files of its own image shape."""
    from serving.images import load_inputs

    with one_line_errors():
        spec, model_name = dataset_and_model(dataset, model_name)
        registry = resolve_home(home, existing=True).registry(model_name)
        version = registry.resolve(model)
        net = registry.load_model(version)  # verified against the digest recorded at publish time
        classes = class_names(registry.classes(version))  # None for MNIST's digits
        names, x = load_inputs(images, spec.image_shape)
        if len(registry.classes(version)) != net.dense_layers[-1].n_out:
            raise DigitflowError(f"{model_name} v{version} names {len(registry.classes(version))} classes, its network "
                                 f"has {net.dense_layers[-1].n_out} outputs: a damaged version")
        if x.shape[1] != net.dense_layers[0].n_in:
            raise DigitflowError(f"{model_name} v{version} takes {net.dense_layers[0].n_in} pixels per image, the "
                                 f"inputs have {x.shape[1]} (another dataset's images? pass --dataset)")
    proba = net.predict_proba(x)
    digits, best = proba.argmax(axis=1), proba.max(axis=1)
    if json_out:
        typer.echo(json.dumps([{"path": n, "digit": int(d), "probability": round(float(p), 6),
                                **({"class": classes[d]} if classes else {})}
                               for n, d, p in zip(names, digits, best)]))
        return
    for n, d, p in zip(names, digits, best):  # names and classes shown, never acting on the terminal
        typer.echo(f"{terminal(n)}: {d}{' ' + terminal(classes[d]) if classes else ''} ({p:.1%})")


@app.command()
@hp_options
def sweep(grid: List[str] = typer.Option(..., "--grid", help="name=v1,v2 (repeat or list several): hidden=128,256 lr=0.05,0.1"),
          extra: Optional[List[str]] = typer.Argument(None, hidden=True),
          home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
          allow_unpinned: bool = ALLOW_UNPINNED, preset: str = PRESET, model_name: Optional[str] = MODEL_NAME,
          dask_address: Optional[str] = typer.Option(None, "--dask-address", help="tcp://HOST:8786 of an existing Dask scheduler; default: a temporary LocalCluster."),
          workers: int = typer.Option(2, "--workers", min=1, help="Worker processes of the temporary LocalCluster."),
          tolerance: float = TOLERANCE, floor: Optional[float] = FLOOR,
          rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES,
          webhook: Optional[str] = WEBHOOK, json_out: bool = typer.Option(False, "--json"), hp: Overrides = None) -> None:
    """Train a grid of hyperparameters in parallel on Dask; publish the best through the gate."""
    with one_line_errors():
        points = parse_grid(list(grid) + list(extra or []))
        spec, _ = dataset_and_model(dataset, model_name, allow_unpinned)
        for point in points:
            hyperparameters(preset, {**overrides_dict(hp), **point}, spec)
        checked(IngestSettings, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries)
        home = start(home, runs="flows.sweep")
        from flows.sweep import sweep as sweep_flow
        import logging

        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)  # the sweep's own log says what matters
        if dask_address:
            runner = DaskTaskRunner(address=dask_address)
        else:
            runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                    "dashboard_address": None})
        result = sweep_flow.with_options(task_runner=runner)(
            grid=points, home=home, mirrors=mirrors_param(mirror), dataset=dataset, allow_unpinned=allow_unpinned,
            preset=preset, model_name=model_name, **overrides_dict(hp),
            tolerance=tolerance, floor=floor, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries,
            webhook=webhook_param(webhook))
    if json_out:
        typer.echo(result.model_dump_json(by_alias=True))
        return
    typer.echo("\n".join(sweep_lines(result)))


def sweep_lines(result) -> list[str]:
    """What `digitflow sweep` prints without --json: a line per grid point, the outcome, the report."""
    return [*(terminal(f"{row.grid_point:40s} val {row.val_accuracy:.4f}  test {row.test_accuracy:.4f}"
                       + ("  ← best" if row.best else "")) for row in result.rows),
            terminal(f"{result.name} v{result.version}: {result.status} — {result.reason}"),
            terminal(f"report: {result.report}")]


# ---- the other commands, by purpose -------------------------------------------------------

app.command()(cli_schedule.serve)      # the pipeline on a schedule, in this process
app.command()(cli_schedule.deploy)     # ... or on workers anywhere
app.command()(cli_operate.api)         # serving the champion over HTTP
app.command()(cli_operate.monitor)     # drift of what the API was asked
app.add_typer(cli_operate.alerts_app, name="alerts")
app.add_typer(cli_operate.server_app, name="server")
app.add_typer(cli_models.app, name="models")  # the registry
app.add_typer(cli_data.app, name="data")      # the ingested data and its checks


def main() -> None:
    """``digitflow``: ``--verbose`` may stand anywhere (tracebacks for expected failures too)."""
    args = sys.argv[1:]
    if "--verbose" in args:
        args = [a for a in args if a != "--verbose"]
        os.environ[env_name("debug")] = "1"
    quiet_expected_failures()
    server.announce = True  # the dashboard link of each run this command starts, once
    command = next((a for a in args if not a.startswith("-")), "")
    interrupt.install(f"digitflow {command}".strip())
    cli = typer.main.get_command(app)
    _flags_as_flags(cli)
    try:
        with one_line_errors():  # every DIGITFLOW_* variable checked once, here; then the command
            settings()
            for warning in misspelt():
                print(f"digitflow: warning: {terminal(warning)}", file=sys.stderr)
            cli(args=args, prog_name="digitflow")
    except typer.Exit as e:
        sys.exit(e.exit_code)


def _flags_as_flags(command) -> None:
    """Show boolean flags as flags in --help (click 8.5 renders their type: ``--json <bool>``,
    as if a value were needed), and each command's help as flowing paragraphs."""
    if command.help:  # a docstring's line breaks are not the terminal's: one paragraph, one flowing text
        command.help = re.sub(r"(?<!\n)\n(?!\n)\s*", " ", inspect.cleandoc(command.help))
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = " "
    for sub in getattr(command, "commands", {}).values():
        _flags_as_flags(sub)
    original = command.get_help_option

    def help_option(ctx):
        option = original(ctx)
        if option is not None:
            option.metavar = " "
        return option

    command.get_help_option = help_option


if __name__ == "__main__":
    sys.exit(main())
