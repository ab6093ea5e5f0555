"""The retraining pipeline: ingest → train → evaluate → publish → gate, as one Prefect flow."""

from prefect import flow, tags
from prefect.runtime import flow_run

from flows.server import announce_run
import tasks.prefect_compat  # noqa: F401  (flow runs end without waiting for their heartbeat thread)
from flows.alerts import alert_if_rejected, on_flow_failure
from flows.contract import (APPROVAL_TIMEOUT, DEFAULT_RETRIES, DEFAULT_ROWS_PER_SHARD, DEFAULT_TIMEOUT,
                            DEFAULT_TOLERANCE, Accuracy, ApprovalMode, ApprovalTimeout, DatasetName, Deadline, Floor, ModelName, Preset, Retries, RowsPerShard, Timeout,
                            Webhook,
                            hyperparameters, with_hyperparameters)
from flows.ingest import ingest
from storage import DigitflowError
from storage.catalog import dataset_and_model, resolve as resolve_dataset
from tasks.common import home_for_run
from tasks.ingest import manifest_ref
from flows.approval import wait_for_approval
from tasks.model import (artifact_key, evaluate, gate, publish, still_trained, train, version_artifacts,
                         would_promote)
from tasks.refs import Decision, Evaluation, Outcome, Published, RunOutcome, TrainedModel


def run_name() -> str:
    params = flow_run.parameters
    return f"retrain-{params.get('preset', 'default')}"


def run_tags(preset: str, model_name: str, dataset: str = "mnist") -> list[str]:
    """The tags of a run, derived from its own parameters (however it was started)."""
    return ["digitflow", f"dataset:{dataset}", f"preset:{preset}", f"model:{model_name}"]


@flow(name="retrain", flow_run_name=run_name, on_failure=[on_flow_failure], on_running=[announce_run])
@with_hyperparameters
def retrain(
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
    deadline: Deadline = None,
    webhook: Webhook = None,
    approval: ApprovalMode = "none",
    approval_timeout: ApprovalTimeout = APPROVAL_TIMEOUT,
    **overrides,
) -> RunOutcome:
    """From nothing to a published, evaluated, gated model version, and what happened to it.

    Args:
        home: Where digitflow keeps its state (default: $DIGITFLOW_HOME, else ~/.digitflow).
        mirrors: Mirror base URLs, tried in order (default: $DIGITFLOW_MIRRORS, else the dataset's public ones).
        dataset: mnist, fashion-mnist, or the path of a dataset spec file (.toml/.json).
        allow_unpinned: Accept dataset files the spec gives no checksum for (the provenance records the hash seen).
        preset: Hyperparameter preset; the hyperparameters below change single values of it
            (an empty field keeps the preset's value).
        model_name: Registry name of the model (default: the dataset's name followed by -mlp; mnist-mlp for MNIST).
        tolerance: Promote when test accuracy ≥ the champion's minus this.
        floor: Never promote below this test accuracy (empty: the dataset's; MNIST 0.97, Fashion-MNIST 0.85).
        rows_per_shard: Rows per Parquet shard.
        timeout: Seconds of silence before a mirror counts as failed.
        retries: Retries of a download after transient failures.
        deadline: Seconds one mirror may take for one file (empty: from the file's size).
        webhook: Where the alert URL is kept: env:VARIABLE or secret:BLOCK (else $DIGITFLOW_WEBHOOK_URL).
        approval: required: a version the gate would promote waits for a person to approve or reject it.
        approval_timeout: Seconds to wait for that answer; no answer is a rejection.
    """
    if "webhook_url" in overrides:  # a deployment made when the URL itself was a parameter
        raise DigitflowError("webhook_url is not a parameter any more (a URL in a flow run's parameters is shown to "
                             "every dashboard user): redeploy with --webhook secret:BLOCK or --webhook env:VARIABLE")
    spec, model_name = dataset_and_model(dataset, model_name, allow_unpinned)  # before any work
    hp = hyperparameters(preset, overrides, spec)
    home = home_for_run(home)
    home.registry(model_name).check_dataset(spec.key)  # another dataset's registry: one line, nothing written
    update_run(tags=run_tags(preset, model_name, spec.name))

    with tags(*run_tags(preset, model_name, spec.name)):  # the subflows carry them too (tasks do not: tasks/common.py)
        # 1. Data: verified Parquet shards (a subflow; cached when nothing changed).
        data = ingest(home=str(home), mirrors=mirrors, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries,
                      deadline=deadline, dataset=dataset, allow_unpinned=allow_unpinned)

        # 2. Train on the train split; cached on (data, hyperparameters, seed, nn/ source).
        # (a copy: a subflow's result as a task input leaves the dashboard's Task Runs tab empty)
        training = dict(progress_key=artifact_key(model_name, "training"), description=f"preset {preset}")
        model = train(data.train.model_copy(), hp, home, **training)
        if not still_trained(model):  # its folder was rewritten since the cached run: train again
            model = train.with_options(refresh_cache=True)(data.train.model_copy(), hp, home, **training)

        # 3-5. Evaluate on the test split, publish an immutable version (identical weights: the
        # existing one), put it through the gate: the subflow `run`, `sweep` and `publish` share.
        outcome = publish_trained(model, home=str(home), dataset=dataset, model_name=model_name, tolerance=tolerance,
                                  floor=floor, webhook=webhook, approval=approval, approval_timeout=approval_timeout)
    if outcome.created:  # the report, metrics and folder on the run the user opened
        version_artifacts(home, outcome.name, outcome.version)
    update_run(name=f"retrain-{preset}: v{outcome.version} {outcome.status}")  # (the run graph drops "→")
    return RunOutcome(**dict(outcome), preset=preset, hyperparameters=hp, dataset=spec.name)


@flow(name="train", flow_run_name="train-{preset}", on_running=[announce_run])
@with_hyperparameters
def train_only(home: str | None = None, dataset: DatasetName = "mnist", preset: Preset = "default",
               **overrides) -> TrainedModel:
    """Train on the ingested shards (no ingest, no publish); returns the trained model's reference,
    whose folder `evaluate --model PATH` and `publish PATH` accept.

    Args:
        home: Where digitflow keeps its state (default: $DIGITFLOW_HOME, else ~/.digitflow).
        dataset: mnist, fashion-mnist, or the path of a dataset spec file (.toml/.json).
        preset: Hyperparameter preset; the hyperparameters after it change single values of it.
    """
    spec = resolve_dataset(dataset)
    hp = hyperparameters(preset, overrides, spec)
    home = home_for_run(home)
    update_run(tags=["digitflow", f"dataset:{spec.name}", f"preset:{preset}"])
    ref = manifest_ref(home.address(home.split("train", spec.key)))
    return train(ref, hp, home, progress_key=artifact_key(spec.default_model_name, "training"),
                 description=f"preset {preset}")


@flow(name="evaluate", flow_run_name="evaluate {model.weights_sha256:.12}", on_running=[announce_run])
def evaluate_model(model: TrainedModel, home: str | None = None, dataset: DatasetName = "mnist") -> Evaluation:
    """Evaluate a model reference (a published version or a trained folder) on the dataset's test split."""
    spec = resolve_dataset(dataset)
    home = home_for_run(home)
    return evaluate(model, manifest_ref(home.address(home.split("test", spec.key))))


@flow(name="publish", flow_run_name="publish {model.weights_sha256:.12}", on_failure=[on_flow_failure], on_running=[announce_run])
def publish_trained(model: TrainedModel, home: str | None = None, dataset: DatasetName = "mnist",
                    model_name: ModelName | None = None, tolerance: Accuracy = DEFAULT_TOLERANCE,
                    floor: Floor = None, webhook: Webhook = None, approval: ApprovalMode = "none",
                    approval_timeout: ApprovalTimeout = APPROVAL_TIMEOUT) -> Outcome:
    """Evaluate → publish → gate: the tail `run`, `sweep` and `digitflow publish` share (a subflow of the
    first two). Evaluates the trained model on the test split, publishes it as an immutable version
    (identical weights: the existing version) and puts it through the promotion gate.

    Args:
        model: The trained model (its folder and weights digest).
        home: Where digitflow keeps its state (default: $DIGITFLOW_HOME, else ~/.digitflow).
        dataset: The dataset it was trained on: mnist, fashion-mnist, or a spec file's path.
        model_name: Registry name of the model (default: the dataset's name followed by -mlp; mnist-mlp for MNIST).
        tolerance: Promote when test accuracy ≥ the champion's minus this.
        floor: Never promote below this test accuracy (empty: the dataset's; MNIST 0.97, Fashion-MNIST 0.85).
        webhook: Where the alert URL is kept: env:VARIABLE or secret:BLOCK (else $DIGITFLOW_WEBHOOK_URL).
        approval: required: a version the gate would promote waits for a person to approve or reject it.
        approval_timeout: Seconds to wait for that answer; no answer is a rejection.
    """
    spec, model_name = dataset_and_model(dataset, model_name)
    home = home_for_run(home)
    home.registry(model_name).check_dataset(spec.key)
    update_run(tags=["digitflow", f"dataset:{spec.name}", f"model:{model_name}"])
    data = {split: manifest_ref(home.address(home.split(split, spec.key))) for split in ("train", "test")}
    if model.train_manifest_sha256 not in (None, data["train"].sha256):
        raise DigitflowError(f"{model.dir} was trained on data {model.train_manifest_sha256[:12]}…, but the "
                             f"ingested train split is {data['train'].sha256[:12]}…: retrain it, or ingest that data")
    metrics = evaluate(model, data["test"])
    published = publish(model, metrics, data["train"], data["test"], home, model_name,
                        dataset=spec.lineage())
    floor = spec.floor if floor is None else floor
    answer = None  # a person's answer, when one is required and the gate would promote
    if approval == "required" and would_promote(published, home, tolerance=tolerance, floor=floor):
        answer = wait_for_approval(published, approval_timeout)  # this run pauses: Resume in the dashboard
    decision = gate(published, home, tolerance=tolerance, floor=floor, approval=answer)
    alert_if_rejected(webhook, published, decision)
    if published.created and not flow_run.parent_flow_run_id:  # else the run that called it shows them
        version_artifacts(home, published.name, published.version)
    outcome = outcome_of(published, decision)
    update_run(name=f"publish: v{outcome.version} {outcome.status}")
    return outcome


def outcome_of(published: Published, decision: Decision) -> Outcome:
    """What a run did to the registry (see ``Outcome``)."""
    champion = decision.champion
    if decision.decided_now:
        return Outcome(**dict(published), status=decision.status, reason=decision.reason, state=decision.state,
                       champion=champion)
    return Outcome(**dict(published), status="unchanged", state=decision.state, champion=champion,
                   reason=f"these weights are already v{published.version}, now {decision.state}"
                          + (f" (champion is v{champion})" if champion not in (None, published.version) else ""))


def update_run(name: str | None = None, tags: list[str] | None = None) -> None:
    """Name the flow run after what it produced, or add tags to it (shown in the dashboard)."""
    from prefect.client.orchestration import get_client

    changes = {}
    if name is not None:
        changes["name"] = name
    if tags is not None:
        changes["tags"] = sorted(set(flow_run.tags or ()) | set(tags))
    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, **changes)
