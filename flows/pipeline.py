"""The retraining pipeline: ingest → train → evaluate → publish → gate, as one Prefect flow."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

import nn
from flows.alerts import alert_if_rejected, on_flow_failure
from flows.ingest import ingest
from storage import DigitflowError
from storage.config import resolve_home
from storage.registry import check_name
from tasks.model import artifact_key, evaluate, gate, publish, train, training_is_intact


def hyperparameters(preset: str, overrides: dict | None) -> nn.presets.Hyperparameters:
    """The preset with overrides, validated: bad values fail here, before any work."""
    try:
        return nn.presets.get(preset, **(overrides or {}))
    except (ValueError, TypeError) as e:
        raise DigitflowError(str(e)) from None


def run_name() -> str:
    params = flow_run.parameters
    return f"retrain-{params.get('preset', 'default')}"


@flow(name="mnist-retrain", flow_run_name=run_name, on_failure=[on_flow_failure])
def retrain(
    home: str | None = None,
    mirrors: list[str] | None = None,
    preset: str = "default",
    overrides: dict | None = None,
    model_name: str = "mnist-mlp",
    tolerance: float = 0.0,
    floor: float = 0.97,
    rows_per_shard: int = 10_000,
    timeout: float = 30.0,
    retries: int = 3,
    deadline: float | None = None,
    webhook_url: str | None = None,
) -> dict:
    """From nothing to a published, evaluated, gated model version. Returns a summary.

    A failed run, or a version the gate rejects, is reported to ``webhook_url`` (else
    ``$DIGITFLOW_WEBHOOK_URL``) when one is set.
    """
    hp = hyperparameters(preset, overrides).to_dict()
    check_name(model_name)  # before any work
    home = str(resolve_home(home))

    # 1. Data: verified Parquet shards (a subflow; cached when nothing changed).
    data = ingest(home=home, mirrors=mirrors, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries,
                  deadline=deadline)

    # 2. Train on the train split; cached on (data, hyperparameters, seed, nn/ source).
    model = train.with_options(refresh_cache=not training_is_intact(home, data["train"], hp))(
        data["train"], hp, home, progress_key=artifact_key(model_name, "training"))

    # 3. Evaluate on the test split.
    metrics = evaluate(model, data["test"])

    # 4. Publish an immutable version (identical weights: the existing version).
    published = publish(model, metrics, data["train"], data["test"], home, model_name)

    # 5. Promotion gate.
    decision = gate(published, home, tolerance=tolerance, floor=floor)

    alert_if_rejected(webhook_url, published, decision)
    outcome = outcome_of(published, decision)
    _rename_run(f"retrain-{preset} → v{published['version']} {outcome['status']}")
    return {**published, **outcome, "preset": preset, "hyperparameters": hp}


def outcome_of(published: dict, decision: dict) -> dict:
    """What a run did to the registry: "promoted" or "rejected" when the gate decided now;
    "unchanged" when these weights were already a decided version (then ``state`` and
    ``reason`` describe that version as it stands now, not its old decision)."""
    if decision["decided_now"]:
        return {"status": decision["status"], "reason": decision["reason"], "state": decision["state"],
                "champion": decision["champion"]}
    champion = decision["champion"]
    return {"status": "unchanged", "state": decision["state"], "champion": champion,
            "reason": f"these weights are already v{published['version']}, now {decision['state']}"
                      + (f" (champion is v{champion})" if champion not in (None, published["version"]) else "")}


def _rename_run(name: str) -> None:
    """Give the flow run a name that says what it produced (shown in the dashboard)."""
    from prefect.client.orchestration import get_client

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name)
