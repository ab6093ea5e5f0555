"""The ``digitflow`` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer

import flows  # noqa: F401  (sets telemetry-off defaults before Prefect is imported)
from flows import console, interrupt, server
from flows.console import progress_display
from serving.app import ApiSettings
from flows.cli_common import (option, ALLOW_UNPINNED, APPROVAL, APPROVAL_TIMEOUT, APPROVAL_WAIT, ApprovalMode, DATASET, DEADLINE, FLOOR, HOME, MIRRORS, MODEL_NAME, PRESET, RETRIES, ROWS, TIMEOUT, TOLERANCE,
                              WEBHOOK, fail, one_line_errors, quiet_expected_failures)
from storage import DigitflowError
from storage.config import IngestSettings, resolve_home
from storage.datasets import class_names, dataset_and_model
from storage.settings import checked, env_name, settings
from storage.text import terminal

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="digitflow: the MNIST retraining pipeline (Prefect 3 + a pure-NumPy network).")


def hp_options(f):
    """Add one flag per hyperparameter (each overrides the preset) to a command; the flags,
    their syntax and help come from the contract (flows/contract.py), like the sweep grid."""
    import functools
    import inspect

    from flows.contract import cli_options, parse_value

    extra = cli_options()
    sig = inspect.signature(f)
    params = [p for p in sig.parameters.values() if p.name != "hp"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                 default=typer.Option(None, flag, metavar=metavar, help=help_))
               for name, flag, metavar, help_ in extra]

    @functools.wraps(f)
    def wrapper(**kwargs):
        with one_line_errors():
            hp = {name: parse_value(name, text) for name, *_ in extra
                  if (text := kwargs.pop(name)) is not None}
        return f(hp=hp, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper


def _start(home=None):
    """Resolve the home (fails fast, before Prefect starts); then the Prefect server: the one in
    PREFECT_API_URL, else the local one (started on first use, flows/server.py), else with
    DIGITFLOW_EPHEMERAL=1 Prefect's temporary one, kept out of reach of the terminal's Ctrl-C."""
    resolved = resolve_home(home) if home is not False else None
    where = f"home {terminal(str(resolved))} · " if resolved is not None else ""
    print(f"digitflow: {where}{server.describe()}", file=sys.stderr, flush=True)  # before Prefect's import
    server.use()
    interrupt.detach_ephemeral_server()
    console.setup(resolved)  # Prefect's log to the dashboard and <home>/logs; one line per step on the terminal
    return str(resolved) if resolved is not None else None


def _mirrors(mirror: list[str] | None, here: bool = True) -> list[str] | None:
    """The mirrors as a flow parameter, unless one carries credentials (user:secret@): flow
    parameters are recorded by Prefect, so those travel in this process's environment instead
    (``here``: the flow runs are this process or its children; a deployment's are not)."""
    from storage.download import redact

    if mirror and any(redact(m) != m for m in mirror):
        if not here:
            raise DigitflowError("--mirror with credentials cannot be recorded in a deployment (its parameters are "
                                 "shown in the dashboard): set DIGITFLOW_MIRRORS on the workers instead")
        os.environ["DIGITFLOW_MIRRORS"] = " ".join(mirror)
        return None
    return list(mirror) if mirror else None


def _webhook(webhook: str | None, here: bool = True) -> str | None:
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


@app.command()
def ingest(home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
           allow_unpinned: bool = ALLOW_UNPINNED,
           rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES,
           deadline: Optional[float] = DEADLINE) -> None:
    """Download, verify and shard a dataset (MNIST by default).

    Writes <home>/data/<dataset>/<split>, repairing whatever is damaged."""
    with one_line_errors():
        dataset_and_model(dataset, None, allow_unpinned)  # a bad spec: one line per mistake, before any download
        IngestSettings.checked(rows_per_shard=rows_per_shard, timeout=timeout, retries=retries, deadline=deadline)
        home = _start(home)
        from flows.ingest import ingest as ingest_flow
        with progress_display():
            refs = ingest_flow(home=home, mirrors=_mirrors(mirror), rows_per_shard=rows_per_shard, timeout=timeout,
                               retries=retries, deadline=deadline, dataset=dataset, allow_unpinned=allow_unpinned)
    for split, ref in refs.items():
        typer.echo(f"{split}: {ref.rows} rows in {ref.shards} shards, manifest {ref.manifest} (sha256 {ref.sha256[:16]}…)")


@app.command()
@hp_options
def run(home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
        allow_unpinned: bool = ALLOW_UNPINNED, preset: str = PRESET, model_name: Optional[str] = MODEL_NAME,
        tolerance: float = TOLERANCE, floor: Optional[float] = FLOOR,
        require_promotion: bool = typer.Option(False, "--require-promotion", help="Exit 1 unless the new version is champion."),
        json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
        webhook: Optional[str] = WEBHOOK, approval: ApprovalMode = APPROVAL, approval_timeout: float = APPROVAL_WAIT,
        rows_per_shard: int = ROWS, timeout: float = TIMEOUT, retries: int = RETRIES,
        deadline: Optional[float] = DEADLINE, hp: dict = None) -> None:
    """Run the whole pipeline: ingest → train → evaluate → publish → promotion gate."""
    from flows.contract import hyperparameters

    with one_line_errors():
        spec, _ = dataset_and_model(dataset, model_name, allow_unpinned)  # invalid values fail before any work
        hyperparameters(preset, hp, spec)
        IngestSettings.checked(rows_per_shard=rows_per_shard, timeout=timeout, retries=retries, deadline=deadline)
        home = _start(home)
        from flows.pipeline import retrain
        with progress_display():
            summary = retrain(home=home, mirrors=_mirrors(mirror), dataset=dataset, allow_unpinned=allow_unpinned,
                              preset=preset, model_name=model_name, **hp,
                              tolerance=tolerance, floor=floor, rows_per_shard=rows_per_shard, timeout=timeout,
                              retries=retries, deadline=deadline, webhook=_webhook(webhook), approval=approval,
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
def train(home: Optional[str] = HOME, dataset: str = DATASET, preset: str = PRESET, hp: dict = None) -> None:
    """Train on the ingested shards (run `digitflow ingest` first).

    Prints the trained model's folder, which `digitflow evaluate --model PATH` and
    `digitflow publish PATH` accept."""
    from flows.contract import hyperparameters

    with one_line_errors():
        spec, _ = dataset_and_model(dataset, None)
        hyperparameters(preset, hp, spec)
        home = _start(home)
        from flows.pipeline import train_only
        _require_split(home, "train", spec.key)
        with progress_display():
            result = train_only(home=home, dataset=dataset, preset=preset, **hp)
    last = result.history[-1]
    typer.echo(f"trained {result.dir} (weights {result.weights_sha256[:16]}…): "
               f"val accuracy {last.get('val_accuracy', float('nan')):.4f} after {len(result.history)} epochs")


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
        home = _start(home)
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
        home = _start(home)
        from flows.pipeline import publish_trained
        outcome = publish_trained(ref, home=home, dataset=dataset, model_name=model_name, tolerance=tolerance,
                                  floor=floor, webhook=_webhook(webhook), approval=approval,
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
        registry = resolve_home(home).registry(model_name)
        version = registry.resolve(model)
        net = registry.load_model(version)  # verified against the digest recorded at publish time
        classes = class_names(registry.classes(version))  # None for MNIST's digits
        names, x = load_inputs(images, spec.image_shape)
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


def check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise DigitflowError(f"--cron {cron!r} is not a valid cron expression") from None


def deployment_parameters(home, mirror, preset, model_name, hp, webhook, dataset="mnist",
                          allow_unpinned=False, here: bool = True, approval: str = "none",
                          approval_timeout: float = APPROVAL_TIMEOUT) -> dict:
    """The deployment's parameters (shown to every dashboard user: no secret goes in; ``here``:
    its runs are children of this process (``serve``), else of workers elsewhere (``deploy``))."""
    from flows.contract import hyperparameters

    spec, model_name = dataset_and_model(dataset, model_name, allow_unpinned)
    hyperparameters(preset, hp, spec)  # invalid values fail now, not at 3 a.m.
    params = {"home": str(resolve_home(home)), "preset": preset, "model_name": model_name}
    if spec.name != "mnist":
        params["dataset"] = dataset if spec.source == "built-in" else spec.source  # a spec file: its absolute path
    if allow_unpinned:
        params["allow_unpinned"] = True
    mirrors, webhook = _mirrors(mirror, here), _webhook(webhook, here)
    if mirrors:
        params["mirrors"] = mirrors
    if hp:
        params.update(hp)
    if webhook:
        params["webhook"] = webhook
    if approval != "none":
        params.update(approval=approval, approval_timeout=approval_timeout)
    return params


@app.command()
@hp_options
def serve(cron: str = typer.Option("0 3 * * *", "--cron", help="Cron schedule of the retraining runs (UTC)."),
          name: str = typer.Option("scheduled", "--name", help="Deployment name."),
          home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
          allow_unpinned: bool = ALLOW_UNPINNED, preset: str = PRESET,
          model_name: Optional[str] = MODEL_NAME, webhook: Optional[str] = WEBHOOK, approval: ApprovalMode = APPROVAL,
          approval_timeout: float = APPROVAL_WAIT, hp: dict = None) -> None:
    """Serve the pipeline as a Prefect deployment on a cron schedule (runs until stopped).

    Runs appear in the dashboard on schedule and can be started from the UI or with
    `prefect deployment run 'retrain/NAME' --param preset=best`."""
    with one_line_errors():
        check_cron(cron)
        params = deployment_parameters(home, mirror, preset, model_name, hp, webhook, dataset, allow_unpinned,
                                       approval=approval, approval_timeout=approval_timeout)
        _start(False)
        from prefect import serve as prefect_serve
        deployment = retrain_deployment(name=name, cron=cron, parameters=params, tags=["digitflow"], description=
                                        f"Retrain {params['model_name']} with preset {preset!r} on {cron!r} (UTC)")
    prefect_serve(deployment)


def retrain_deployment(**kwargs):
    """The ``retrain`` flow as a deployment (``serve``, ``deploy``; ``kwargs`` as Prefect's
    ``to_deployment`` takes them), its Run form made of plain inputs (``prefect_compat`` entry 7)."""
    from flows.contract import form_switches
    from flows.pipeline import retrain
    from tasks.prefect_compat import plain_form_fields

    deployment = retrain.to_deployment(**kwargs)
    plain_form_fields(deployment, form_switches())
    return deployment


@app.command()
@hp_options
def deploy(pool: str = typer.Option("digitflow", "--pool", help="Process work pool (created if missing)."),
           cron: Optional[str] = typer.Option(None, "--cron", help="Cron schedule (UTC); none: run on demand."),
           name: str = typer.Option("workers", "--name", help="Deployment name."),
           home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
           allow_unpinned: bool = ALLOW_UNPINNED, preset: str = PRESET,
           model_name: Optional[str] = MODEL_NAME, webhook: Optional[str] = WEBHOOK, approval: ApprovalMode = APPROVAL,
           approval_timeout: float = APPROVAL_WAIT,
           retrain_on_drift: bool = typer.Option(False, "--retrain-on-drift", help="Also create an automation that "
                                                 "runs this deployment when `digitflow monitor` reports drift."),
           hp: dict = None) -> None:
    """Register the pipeline for a process work pool, to run on workers anywhere.

    Runs execute on `prefect worker start --pool POOL` on any machine with digitflow installed
    (the entrypoint is the module, not this checkout). The home is --home / $DIGITFLOW_HOME when
    given here, else the worker's $DIGITFLOW_HOME."""
    with one_line_errors():
        if cron is not None:
            check_cron(cron)
        params = deployment_parameters(home, mirror, preset, model_name, hp, webhook, dataset, allow_unpinned,
                                       here=False, approval=approval, approval_timeout=approval_timeout)
        _start(False)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.deployments.runner import EntrypointType, deploy as prefect_deploy
        from prefect.exceptions import ObjectAlreadyExists
        if not (home or settings().home):
            del params["home"]  # the worker's $DIGITFLOW_HOME decides (a path here means nothing there)
        with get_client(sync_client=True) as client:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
        deployment = retrain_deployment(name=name, cron=cron, parameters=params, tags=["digitflow"],
                                        entrypoint_type=EntrypointType.MODULE_PATH)
        [deployment_id] = prefect_deploy(deployment, work_pool_name=pool, build=False, push=False,
                                         print_next_steps_message=False, ignore_warnings=True)
        if retrain_on_drift:
            from flows.monitor import retrain_on_drift as install

            automation = install(deployment_id, params["model_name"])
    typer.echo(f"deployment retrain/{name} ({deployment_id}) on work pool {pool!r}"
               + (f", schedule {cron!r}" if cron else "") + f"; start a worker: prefect worker start --pool {pool}")
    if retrain_on_drift:
        typer.echo(f"automation {automation!r}: a {DRIFT_EVENT} event for {params['model_name']} "
                   f"(`digitflow monitor`) runs this deployment")


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
          webhook: Optional[str] = WEBHOOK, json_out: bool = typer.Option(False, "--json"), hp: dict = None) -> None:
    """Train a grid of hyperparameters in parallel on Dask; publish the best through the gate."""
    from flows.contract import parse_grid

    with one_line_errors():
        points = parse_grid(list(grid) + list(extra or []))
        from flows.contract import hyperparameters

        spec, _ = dataset_and_model(dataset, model_name, allow_unpinned)
        for point in points:
            hyperparameters(preset, {**hp, **point}, spec)
        IngestSettings.checked(rows_per_shard=rows_per_shard, timeout=timeout, retries=retries)
        home = _start(home)
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
            grid=points, home=home, mirrors=_mirrors(mirror), dataset=dataset, allow_unpinned=allow_unpinned,
            preset=preset, model_name=model_name, **hp,
            tolerance=tolerance, floor=floor, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries,
            webhook=_webhook(webhook))
    if json_out:
        typer.echo(result.model_dump_json())
        return
    for row in result.rows:
        typer.echo(f"{row['grid point']:40s} val {row['val_accuracy']:.4f}  test {row['test_accuracy']:.4f}"
                   + ("  ← best" if row["best"] else ""))
    typer.echo(f"{result.name} v{result.version}: {result.status} — {result.reason}")
    typer.echo(f"report: {result.report}")


@app.command()
def api(host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
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
    from serving.app import serve as serve_api

    with one_line_errors():
        _, model_name = dataset_and_model(dataset, model_name)
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            raise DigitflowError(f"--log-level {log_level!r}: use info, warning or error")
        settings = checked(ApiSettings, home=str(resolve_home(home)), model_name=model_name, model=model, token=token,
                           max_body=max_body, max_pixels=max_pixels, max_images=max_images,
                           max_request_pixels=max_request_pixels, poll=float(poll))
        if not token and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
            typer.echo(f"digitflow api: warning: listening on {host} without a token: anyone who can reach this "
                       "machine can use the API (set DIGITFLOW_API_TOKEN)", err=True)
        typer.echo(f"digitflow api: {model_name} {model} from {settings.home} on http://{host}:{port}/ "
                   f"({workers} worker{'s' if workers > 1 else ''}{', token required' if token else ''})", err=True)
        serve_api(settings, host=host, port=port, workers=workers, log_level=log_level)


alerts_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Alerts as Prefect automations.")
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("install")
def alerts_install(webhook: str = typer.Option(..., "--webhook", help="URL that receives the POSTed alerts."),
                   block_name: str = typer.Option("digitflow-alerts", "--block-name")) -> None:
    """Create Prefect automations on the server (PREFECT_API_URL): a failed run or a gate
    rejection sends a notification to WEBHOOK, even when the run's own process is gone."""
    from flows.alerts import install_automations, where

    with one_line_errors():
        _start(False)
        names = install_automations(webhook, block_name)
    for name in names:
        typer.echo(f"automation {name!r} → {where(webhook)}")


server_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="The local Prefect server digitflow starts when PREFECT_API_URL is not set.")
app.add_typer(server_app, name="server")


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
    if not log.is_file():
        typer.echo(f"no log yet ({log})")
        return
    with open(log, "rb") as f:
        for line in collections.deque(f, maxlen=lines):
            typer.echo(terminal(line.decode("utf-8", "replace").rstrip("\n")))


DRIFT_EVENT = "digitflow.drift.detected"  # (flows.monitor.DRIFT_EVENT, without importing Prefect for --help)


@app.command()
def monitor(api: str = typer.Option("http://127.0.0.1:8000", "--api", help="Base URL of a running `digitflow api` "
                                    "(its token from $DIGITFLOW_API_TOKEN)."),
            threshold: float = typer.Option(0.25, "--threshold", min=0.0001, max=100.0,
                                            help="PSI above which a statistic counts as drifted."),
            min_images: int = typer.Option(100, "--min-images", min=1, max=1_000_000,
                                           help="Images the API's window needs before anything is judged."),
            cron: Optional[str] = typer.Option(None, "--cron", help="Serve the monitor on this schedule (UTC) "
                                               "instead of running it once."),
            json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON.")) -> None:
    """Compare what a running API was asked with its version's test split; emit
    `digitflow.drift.detected` (for `deploy --retrain-on-drift`) when the inputs drifted."""
    from flows.monitor import check_api_url, monitor as monitor_flow

    with one_line_errors():
        if cron is not None:
            check_cron(cron)
        check_api_url(api)
        _start(False)
        if cron is not None:
            monitor_flow.serve(name="monitor", cron=cron, parameters={"api_url": api, "threshold": threshold,
                                                                        "min_images": min_images},
                               tags=["digitflow"])
            return
        summary = monitor_flow(api_url=api, threshold=threshold, min_images=min_images)
    if json_out:
        typer.echo(json.dumps(summary))
        return
    psi = ", ".join(f"{k} {v:.3f}" for k, v in summary["psi"].items() if v is not None) or "not compared"
    typer.echo(terminal(f"{summary['model']} v{summary['version']}: {summary['window_images']} served images; "
                        f"{'DRIFTED: ' + ', '.join(summary['drifted']) if summary['drifted'] else 'no drift'} "
                        f"(PSI {psi})"))


from flows.cli_models import app as models_app  # noqa: E402
from flows.cli_data import app as data_app  # noqa: E402

app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


def main() -> None:
    """``digitflow``: ``--verbose`` may stand anywhere (tracebacks for expected failures too)."""
    args = sys.argv[1:]
    if "--verbose" in args:
        args = [a for a in args if a != "--verbose"]
        os.environ["DIGITFLOW_DEBUG"] = "1"
    quiet_expected_failures()
    server.announce = True  # the dashboard link of each run this command starts, once
    command = next((a for a in args if not a.startswith("-")), "")
    interrupt.install(f"digitflow {command}".strip())
    cli = typer.main.get_command(app)
    _flags_as_flags(cli)
    try:
        with one_line_errors():  # every DIGITFLOW_* variable checked once, here; then the command
            settings()
            cli(args=args, prog_name="digitflow")
    except typer.Exit as e:
        sys.exit(e.exit_code)


def _flags_as_flags(command) -> None:
    """Show boolean flags as flags in --help (click 8.5 renders their type: ``--json <bool>``,
    as if a value were needed)."""
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
