"""A hyperparameter sweep fanned out as Prefect tasks on a Dask cluster.

ingest → train every grid point in parallel (DaskTaskRunner) → evaluate each → one
comparison report → publish the best (by validation accuracy) through the promotion gate.
"""

import json

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from flows.server import announce_run
from storage.settings import settings
import tasks.prefect_compat  # noqa: F401  (flow runs end without waiting for their heartbeat thread)
from flows.alerts import on_flow_failure
from flows.ingest import ingest
from flows.contract import (DEFAULT_RETRIES, DEFAULT_ROWS_PER_SHARD, DEFAULT_TIMEOUT,
                            DEFAULT_TOLERANCE, Accuracy, DatasetName, Floor, ModelName, Overrides, Preset, Retries, RowsPerShard, Timeout, Webhook,
                            hyperparameters, overrides_dict, with_hyperparameters)
from flows.pipeline import publish_trained, run_tags, update_run
from storage import DigitflowError, remote
from storage.atomic import write_bytes, write_json
from storage.catalog import dataset_and_model
from tasks.common import home_for_run
from tasks.prefect_compat import dask_cluster
from tasks.model import artifact_key, evaluate, train, version_artifacts
from tasks.refs import Outcome, SweepOutcome, SweepRow


def describe_runner() -> str:
    runner = FlowRunContext.get().task_runner
    client = getattr(runner, "client", None)
    if client is None:
        return type(runner).__name__
    workers = client.scheduler_info().get("workers", {})
    cluster = dask_cluster(runner)
    where = (f"a temporary {type(cluster).__name__}" if cluster is not None and runner.address is None
             else "an existing Dask cluster")
    return f"{type(runner).__name__} on {where} at {client.scheduler.address} with {len(workers)} workers"





def wait_while_workers_live(futures: list, poll: float = 2.0) -> None:
    """Wait for ``futures``; fail in one line, instead of waiting forever, when the Dask cluster
    has had no worker for DIGITFLOW_WORKERLESS_GRACE seconds or a worker died running one of them."""
    import time

    from prefect.futures import wait

    runner = FlowRunContext.get().task_runner
    client = getattr(runner, "client", None)
    since = None
    while True:
        if not wait(futures, timeout=poll).not_done:
            break
        if client is None:
            continue
        try:
            workers = len(client.ncores())
        except (OSError, TimeoutError):  # the scheduler itself is gone or not answering
            workers = 0
        if workers:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since > (grace := settings().workerless_grace):
            raise DigitflowError(f"the Dask cluster at {client.scheduler.address} has had no worker for "
                                 f"{grace:.0f} s; the sweep stopped (start `dask worker` processes "
                                 "and rerun: finished trainings are cached)")
    for future in futures:
        if future.state.is_failed():
            exc = future.state.result(raise_on_failure=False)
            if type(exc).__name__ == "KilledWorker":
                raise DigitflowError(f"a Dask worker died while running a sweep task ({exc}); the sweep stopped, "
                                     "rerun to resume from the cached work")


def sweep_name() -> str:
    return f"sweep-{len(flow_run.parameters.get('grid') or [])}-runs"


@flow(name="sweep", flow_run_name=sweep_name, on_failure=[on_flow_failure], on_running=[announce_run])
@with_hyperparameters
def sweep(
    grid: list[Overrides],
    home: str | None = None,
    mirrors: list[str] | None = None,
    dataset: DatasetName = "mnist",
    allow_unpinned: bool = False,
    preset: Preset = "default",
    model_name: ModelName | None = None,
    tolerance: Accuracy = DEFAULT_TOLERANCE,
    floor: Floor = None,
    rows_per_shard: RowsPerShard = DEFAULT_ROWS_PER_SHARD,
    timeout: Timeout = DEFAULT_TIMEOUT,
    retries: Retries = DEFAULT_RETRIES,
    webhook: Webhook = None,
    **overrides,
) -> SweepOutcome:
    """Train every grid point (each on top of preset + the hyperparameters given), compare, publish the best.

    Args:
        grid: The grid points: each sets some hyperparameters on top of the preset and those given below.
        dataset: mnist, fashion-mnist, or the path of a dataset spec file (.toml/.json).
        allow_unpinned: Accept dataset files the spec gives no checksum for (the provenance records the hash seen).
        model_name: Registry name of the model (default: the dataset's name followed by -mlp; mnist-mlp for MNIST).
    """
    log = get_run_logger()
    base = overrides_dict(overrides)
    points = [overrides_dict(point) for point in grid]
    spec, model_name = dataset_and_model(dataset, model_name, allow_unpinned)
    configs = [hyperparameters(preset, {**base, **point}, spec) for point in points]
    if not configs:
        raise DigitflowError("the grid is empty")
    home = home_for_run(home)
    update_run(tags=[*run_tags(preset, model_name, spec.name), "sweep"])
    log.info("sweep of %d runs; task runner: %s", len(configs), describe_runner())

    with tags(*run_tags(preset, model_name, spec.name), "sweep"):
        data = ingest(home=str(home), mirrors=mirrors, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries,
                      dataset=dataset, allow_unpinned=allow_unpinned)

        # Fan out: one training task per grid point, in parallel on the Dask workers.
        # (copies: a subflow's result as a task input leaves the dashboard's Task Runs tab empty)
        train_ref, test_ref = data.train.model_copy(), data.test.model_copy()
        trained = [train.submit(
            train_ref, hp, home, progress_key=artifact_key(model_name, f"sweep-{i}"), blas_threads=1,
            description=f"sweep point {i + 1}/{len(configs)} {json.dumps(point)}")
            for i, (hp, point) in enumerate(zip(configs, points))]
        scored = [evaluate.submit(model, test_ref) for model in trained]
        wait_while_workers_live(trained + scored)
        results = []
        for point, model_future, metrics_future in zip(points, trained, scored):
            model, metrics = model_future.result(), metrics_future.result()
            last = model.history[-1]
            results.append({"point": point, "model": model, "metrics": metrics,
                            "val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss")})

        # Select on validation accuracy (the test split only reports), then the shared tail
        # (a subflow: its evaluation is the cached one above).
        best = max(results, key=lambda r: (r["val_accuracy"] or 0.0, -(r["val_loss"] or 0.0)))
        outcome = publish_trained(best["model"], home=str(home), dataset=dataset, model_name=model_name,
                                  tolerance=tolerance,
                                  floor=floor, webhook=webhook)
    if outcome.created:  # the report, metrics and folder on the sweep's own run
        version_artifacts(home, outcome.name, outcome.version)
    rows = [SweepRow(grid_point=json.dumps(r["point"]), val_accuracy=round(r["val_accuracy"] or 0, 4),
                     test_accuracy=round(r["metrics"].test_accuracy, 4), train_seconds=r["model"].train_seconds,
                     best=r is best) for r in results]
    report = _report(rows, outcome)
    folder = home.sweep(str(flow_run.id) if flow_run.id else "latest")
    write_bytes(folder / "report.md", report.encode())
    write_json(folder / "results.json", {"rows": [r.model_dump(by_alias=True) for r in rows], "outcome": outcome.model_dump(mode="json")})
    remote.push_dir(home.address(folder), "results.json")  # a remote home: into the bucket, results last
    create_table_artifact([r.model_dump(by_alias=True) for r in rows], key=artifact_key(model_name, "sweep"), description="Sweep comparison")
    create_markdown_artifact(report, key=artifact_key(model_name, "sweep-report"), description="Sweep report")
    log.info("best %s: val %.4f, test %.4f → v%d %s", best["point"], best["val_accuracy"] or 0,
             best["metrics"].test_accuracy, outcome.version, outcome.status)
    update_run(name=f"sweep-{len(configs)}-runs: v{outcome.version} {outcome.status}")  # (the run graph drops "→")
    return SweepOutcome(**dict(outcome), rows=rows, report=home.address(folder / "report.md"))


def _report(rows: list[SweepRow], outcome: Outcome) -> str:
    lines = ["# Sweep", "", "| grid point | val accuracy | test accuracy | train s | |", "|---|---|---|---|---|"]
    lines += [f"| `{r.grid_point}` | {r.val_accuracy:.4f} | {r.test_accuracy:.4f} | {r.train_seconds:.1f} | "
              f"{'**best**' if r.best else ''} |" for r in rows]
    verdict = (f"the gate {outcome.status} it: {outcome.reason}" if outcome.status != "unchanged"
               else f"it was {outcome.reason}")
    lines += ["", f"The best by validation accuracy was published as {outcome.name} v{outcome.version} "
              f"and {verdict}."]
    return "\n".join(lines) + "\n"
