"""`digitflow serve` and `digitflow deploy`: the pipeline on a schedule, here or on workers anywhere."""

from __future__ import annotations

from typing import List, Optional

import typer

from flows.cli_common import (ALLOW_UNPINNED, APPROVAL, APPROVAL_TIMEOUT, APPROVAL_WAIT, DATASET, HOME, MIRRORS,
                              MODEL_NAME, PRESET, WEBHOOK, ApprovalMode, hp_options, mirrors_param, one_line_errors,
                              start, webhook_param)
from flows.contract import Overrides, hyperparameters, overrides_dict
from storage import DigitflowError
from storage.config import resolve_home
from storage.catalog import dataset_and_model
from storage.settings import settings

DRIFT_EVENT = "digitflow.drift.detected"  # (flows.monitor.DRIFT_EVENT, without importing Prefect for --help)


def check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise DigitflowError(f"--cron {cron!r} is not a valid cron expression") from None


def deployment_parameters(home, mirror, preset, model_name, hp: Overrides | None, webhook, dataset="mnist",
                          allow_unpinned=False, here: bool = True, approval: str = "none",
                          approval_timeout: float = APPROVAL_TIMEOUT) -> dict:
    """The deployment's parameters (shown to every dashboard user: no secret goes in; ``here``:
    its runs are children of this process (``serve``), else of workers elsewhere (``deploy``))."""
    spec, model_name = dataset_and_model(dataset, model_name, allow_unpinned)
    hyperparameters(preset, hp, spec)  # invalid values fail now, not at 3 a.m.
    params = {"home": str(resolve_home(home)), "preset": preset, "model_name": model_name}
    if spec.name != "mnist":
        params["dataset"] = dataset if spec.source == "built-in" else spec.source  # a spec file: its absolute path
    if allow_unpinned:
        params["allow_unpinned"] = True
    mirrors, webhook = mirrors_param(mirror, here), webhook_param(webhook, here)
    if mirrors:
        params["mirrors"] = mirrors
    params.update(overrides_dict(hp))  # (the flags given; the rest stay the preset's)
    if webhook:
        params["webhook"] = webhook
    if approval != "none":
        params.update(approval=approval, approval_timeout=approval_timeout)
    return params


@hp_options
def serve(cron: str = typer.Option("0 3 * * *", "--cron", help="Cron schedule of the retraining runs (UTC)."),
          name: str = typer.Option("scheduled", "--name", help="Deployment name."),
          home: Optional[str] = HOME, mirror: Optional[List[str]] = MIRRORS, dataset: str = DATASET,
          allow_unpinned: bool = ALLOW_UNPINNED, preset: str = PRESET,
          model_name: Optional[str] = MODEL_NAME, webhook: Optional[str] = WEBHOOK, approval: ApprovalMode = APPROVAL,
          approval_timeout: float = APPROVAL_WAIT, hp: Overrides = None) -> None:
    """Serve the pipeline as a Prefect deployment on a cron schedule (runs until stopped).

    Runs appear in the dashboard on schedule and can be started from the UI or with
    `prefect deployment run 'retrain/NAME' --param preset=best`."""
    with one_line_errors():
        check_cron(cron)
        params = deployment_parameters(home, mirror, preset, model_name, hp, webhook, dataset, allow_unpinned,
                                       approval=approval, approval_timeout=approval_timeout)
        start(False)
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
           hp: Overrides = None) -> None:
    """Register the pipeline for a process work pool, to run on workers anywhere.

    Runs execute on `prefect worker start --pool POOL` on any machine with digitflow installed
    (the entrypoint is the module, not this checkout). The home is --home / $DIGITFLOW_HOME when
    given here, else the worker's $DIGITFLOW_HOME."""
    with one_line_errors():
        if cron is not None:
            check_cron(cron)
        params = deployment_parameters(home, mirror, preset, model_name, hp, webhook, dataset, allow_unpinned,
                                       here=False, approval=approval, approval_timeout=approval_timeout)
        start(False)
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
