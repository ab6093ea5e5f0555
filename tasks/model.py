"""Model tasks: train → evaluate → publish → gate. Thin wrappers over nn/ and storage/."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
from prefect import get_run_logger
from prefect.events import emit_event
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

import nn
from nn.metrics import classification_report
from publishing import card, report as report_files
from publishing.version import write_version
from storage import DigitflowError, checks, remote, within
from storage.atomic import read_json, sha256_file, staged_dir, write_json, writing
from storage.home import Home
from storage.registry import DEFAULT_NAME, DEFAULT_TOLERANCE, RECORD_LIMIT, now
from storage.shards import image_shape, read_split
from storage.text import count, md
from tasks import progress
from tasks.common import CACHED, TOLD_BY_THE_OUTCOME, artifact_key, code_version, content_key, verified_task
from storage.records import DatasetLineage, Lineage, Metrics
from tasks.refs import Answer, Decision, Evaluation, Hyperparameters, Published, SplitRef, TrainedModel


class TrainingDiverged(DigitflowError):
    pass


REJECTED_EVENT = "digitflow.model.rejected"  # emitted when the gate rejects a version


def split_folder(ref: SplitRef) -> Path:
    """This machine's folder of a split (fetched, in a remote home), after checking its manifest
    is the one the reference names."""
    folder = remote.pull_dir(ref.dir, "manifest.json", progress.report)
    digest = sha256_file(folder / "manifest.json")
    if digest != ref.sha256:
        raise DigitflowError(f"{ref.manifest}: SHA-256 {digest[:16]}… is not the {ref.sha256[:16]}… "
                             "this run ingested (rerun `digitflow ingest`)")
    return folder


def load_split(ref: SplitRef) -> tuple[np.ndarray, np.ndarray, dict]:
    """A split's shards read whole: (pixels/255 (N, rows·cols), labels (N,), manifest)."""
    return read_split(split_folder(ref))


def load_rows(ref: SplitRef):
    """Like ``load_split``, but the images stay in the split's uint8 row file (storage.rowstore),
    read a chunk of rows at a time: memory does not grow with the split."""
    from storage.rowstore import open_rows

    return open_rows(split_folder(ref), ref.sha256)


def training_id(train_ref: SplitRef, hyperparameters: Hyperparameters) -> str:
    """What identifies a training run: data, hyperparameters (with seed) and the nn/ source."""
    material = json.dumps([train_ref.sha256, hyperparameters.to_dict(), code_version("nn")], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def train_run_name(hp: Hyperparameters) -> str:
    """``train [512], 12 epochs``: the train task's run name in the dashboard and the terminal."""
    return f"train {list(hp.hidden)}, {count(hp.epochs, 'epoch')}"


def training_dir(home: Home, train_ref: SplitRef, hyperparameters: Hyperparameters) -> Path:
    return Home(home).trained / training_id(train_ref, hyperparameters)


@verified_task(
    # Retrained unless the trained folder is there and hashes to the digest it recorded.
    intact=lambda a: training_is_intact(a["home"], a["train"], a["hyperparameters"]),
    task_run_name=lambda parameters: train_run_name(parameters["hyperparameters"]),
    cache_key_fn=content_key(lambda p: (training_id(p["train"], p["hyperparameters"]), str(p["home"])), code=("nn",)),
    **CACHED,
)
def train(train: SplitRef, hyperparameters: Hyperparameters, home: Home, progress_key: str,
          blas_threads: int | None = None, description: str = "") -> TrainedModel:
    """Train on the train split's shards; save model.npz/model.json; return a reference.

    ``blas_threads`` caps BLAS threads (e.g. 1 per run when several train side by side);
    ``description`` names the run in the progress artifact, before its architecture (e.g. the preset).
    """
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(blas_threads):
            return _train(train, hyperparameters, home, progress_key, description)
    return _train(train, hyperparameters, home, progress_key, description)


def _train(train: SplitRef, hp: Hyperparameters, home: Home, progress_key: str, description: str) -> TrainedModel:
    log = get_run_logger()
    hp.validate()
    home = Home(home)
    address = home.address(training_dir(home, train, hp))
    if remote.is_url(address) and remote.committed(address, TRAINING_RECORD):
        # Trained before, on this or another machine: fetched and verified, not trained again.
        ref = trained_ref(address)
        log.info("already trained by another run: %s (weights %s…), fetched and verified", address,
                 ref.weights_sha256[:16])
        return ref
    x, y, manifest = load_rows(train)  # row by row: the split is never in memory as float32
    n_classes, shape = len(manifest["class_counts"]), image_shape(manifest)
    log.info("training %s on %d images (%d held out for validation), seed %d", list(hp.hidden), len(y),
             round(len(y) * hp.val_fraction), hp.seed)
    architecture = "-".join(map(str, (x.shape[1], *hp.hidden, n_classes)))
    out = training_dir(home, train, hp)
    # A checkpoint after every epoch, beside the (not yet existing) model folder: a killed
    # training resumes where it stopped, bit for bit; removed once the model is complete.
    checkpoint_path = out.with_name(f".{out.name}.checkpoint.npz")
    resume = _resume_from(checkpoint_path, out.name, log)
    resumed = f", resumed at epoch {resume.epoch + 1}" if resume else ""
    label = f"{description}: " if description else ""
    artifact = create_progress_artifact(100.0 * (resume.epoch if resume else 0) / hp.epochs, key=progress_key,
                                        description=(f"Training {label}{architecture}, {count(hp.epochs, 'epoch')}"
                                                     f" (seed {hp.seed}, data {train.sha256[:12]}{resumed})"))
    if resume:
        log.info("resumed at epoch %d of %d from the checkpoint %s", resume.epoch + 1, hp.epochs, checkpoint_path)

    def on_epoch(r: dict) -> None:
        log.info("epoch %d/%d: lr %.4g, train loss %.4f acc %.4f, val loss %.4f acc %.4f (%.1f s)",
                 r["epoch"], hp.epochs, r["lr"], r["train_loss"], r["train_accuracy"],
                 r.get("val_loss", float("nan")), r.get("val_accuracy", float("nan")), r["seconds"])
        update_progress_artifact(artifact, 100.0 * r["epoch"] / hp.epochs)
        progress.report("train", r["epoch"], hp.epochs, f"epoch {r['epoch']}/{hp.epochs} done: val acc "
                        f"{r.get('val_accuracy', float('nan')):.4f}")

    def on_batch(epoch: int, batch: int, batches: int, loss: float, accuracy: float) -> None:
        progress.report("train", epoch - 1 + batch / batches, hp.epochs,
                        f"epoch {epoch}/{hp.epochs} batch {batch}/{batches}: loss {loss:.4f} acc {accuracy:.4f}")

    def checkpoint(state: nn.TrainState) -> None:
        state.training_id = out.name
        with writing(checkpoint_path):
            nn.save_checkpoint(checkpoint_path, state)

    t0 = time.perf_counter()
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                model, history = nn.presets.train(hp, x, y, on_epoch=on_epoch, on_batch=progress.on_batch(on_batch),
                                                  checkpoint=checkpoint, resume=resume,
                                                  n_classes=n_classes, image_shape=shape)
            except nn.CheckpointMismatch as e:  # checked before anything was set: start again, never stuck
                log.warning("%s: %s; discarded, starting from epoch 1", checkpoint_path, e)
                checkpoint_path.unlink(missing_ok=True)
                resumed = ""
                model, history = nn.presets.train(hp, x, y, on_epoch=on_epoch, on_batch=progress.on_batch(on_batch),
                                                  checkpoint=checkpoint,
                                                  n_classes=n_classes, image_shape=shape)
    except nn.NonFiniteLossError as e:
        checkpoint_path.unlink(missing_ok=True)
        raise TrainingDiverged(f"{e}; nothing was published") from None
    seconds = time.perf_counter() - t0
    update_progress_artifact(artifact, 100.0)
    digest = nn.digest(model)
    with staged_dir(out) as staging:  # replaces an incomplete earlier attempt, never shows a partial one
        nn.save(model, staging)
        write_json(staging / "training.json", {"history": history.epochs, "hyperparameters": hp.to_dict(),
                                               "train_manifest_sha256": train.sha256,
                                               "weights_sha256": digest, "best_epoch": history.best_epoch,
                                               "stopped_early": history.stopped_early,
                                               "train_seconds": round(seconds, 2)})
    checkpoint_path.unlink(missing_ok=True)  # the model is complete
    remote.push_dir(address, TRAINING_RECORD, progress.report)  # the model files, then training.json: the commit point
    log.info("trained in %.1f s%s; weights %s…", seconds, resumed, digest[:16])
    return TrainedModel(dir=address, weights_sha256=digest, history=history.epochs, best_epoch=history.best_epoch,
                        stopped_early=history.stopped_early, train_seconds=round(seconds, 2),
                        hyperparameters=hp, train_manifest_sha256=train.sha256)


def _resume_from(path: Path, training: str, log) -> nn.TrainState | None:
    """The checkpoint a killed run of this training left, if it is readable and its own."""
    if not path.exists():
        return None
    try:
        state = nn.load_checkpoint(path)
    except nn.ModelFormatError as e:
        log.warning("%s; starting from epoch 1", e)
        return None
    if state.training_id != training:
        log.warning("%s belongs to another training; starting from epoch 1", path)
        return None
    return state


TRAINING_RECORD = "training.json"  # written last into a trained folder: its commit point


def training_is_intact(home: Home, train_ref: SplitRef, hyperparameters: Hyperparameters) -> bool:
    """The trained model is there and its arrays hash to the digest recorded when it was made
    (in a remote home: it is committed in the bucket; verified when fetched for use)."""
    d = training_dir(home, train_ref, hyperparameters)
    if Home(home).store is not None:
        return remote.committed(Home(home).address(d), TRAINING_RECORD)
    try:
        nn.load(d, expect_digest=read_json(d / "training.json")["weights_sha256"])
        return True
    except (OSError, ValueError, KeyError, TypeError):  # missing, damaged, or from before digests were recorded
        return False


def trained_ref(folder: str | Path) -> TrainedModel:
    """The reference of a trained model folder (``<home>/trained/<id>``, as `digitflow train`
    prints it, or its object URL: fetched, and named by the URL), verified: its arrays must hash
    to the digest recorded in its training.json."""
    address = str(folder) if remote.is_url(str(folder)) else None
    if address:
        folder = remote.pull_dir(address, TRAINING_RECORD)
    folder = Path(folder).expanduser().resolve()
    try:
        info = read_json(folder / "training.json", limit=RECORD_LIMIT)
        ref = TrainedModel(dir=address or str(folder), weights_sha256=info["weights_sha256"],
                           history=info.get("history", []), best_epoch=info.get("best_epoch"),
                           stopped_early=info.get("stopped_early", False), train_seconds=info.get("train_seconds", 0.0),
                           hyperparameters=info.get("hyperparameters"),
                           train_manifest_sha256=info.get("train_manifest_sha256"))
    except FileNotFoundError:
        raise DigitflowError(f"{folder}: not a trained model folder (no training.json; `digitflow train` "
                             "prints one)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # (ValueError: a record that does not fit)
        raise DigitflowError(f"{folder / 'training.json'}: damaged ({type(e).__name__})") from None
    load_verified(ref)
    return ref


def still_trained(model: TrainedModel) -> bool:
    """Does the trained folder still hold the weights its (possibly cached) reference names? A
    folder rewritten behind our back, its training.json with it, passes the cache's own check;
    this compares with the reference's digest, which the folder cannot rewrite. False: the folder
    is discarded (one warning) so the caller trains again instead of failing on every rerun."""
    try:
        load_verified(model)
        return True
    except DigitflowError as e:
        get_run_logger().warning("%s; discarded, training again", e)
        if not remote.is_url(model.dir):
            shutil.rmtree(model.dir, ignore_errors=True)
        return False


def load_verified(model: TrainedModel) -> nn.Sequential:
    """The network a model reference names, refused unless it hashes to the reference's digest."""
    try:
        return nn.load(remote.pull_dir(model.dir, TRAINING_RECORD), expect_digest=model.weights_sha256)
    except nn.ModelFormatError as e:
        raise DigitflowError(str(e)) from None


def files_digest(model_dir: str) -> str:
    """SHA-256 over the bytes of model.json and model.npz as they are now (cache-key material:
    a file changed behind our back can never return a result computed from the old one)."""
    h = hashlib.sha256()
    for name in ("model.json", "model.npz"):  # (objects of a remote home: their ETag and SHA-256 now)
        h.update(remote.fingerprint(remote.join(str(model_dir), name)).encode())
    return h.hexdigest()


def measure(model: TrainedModel, test: SplitRef) -> Evaluation:
    """Evaluate a saved, verified model on the test split (pure; used by the task and the CLI)."""
    model = load_verified(model)
    x, y, _ = load_split(test)
    if x.shape[1] != model.dense_layers[0].n_in:
        raise DigitflowError(f"{test.dir}: images of {x.shape[1]} pixels, but the model takes "
                             f"{model.dense_layers[0].n_in} inputs (a model of another dataset?)")
    model.predict_proba(x[:1000])  # warm up buffers
    t0 = time.perf_counter()
    proba = model.predict_proba(x)
    seconds = time.perf_counter() - t0
    report = classification_report(y, proba)
    return Evaluation(test_accuracy=report["accuracy"], test_loss=report["loss"], macro_f1=report["macro_f1"],
                      per_class=report["per_class"], confusion_matrix=report["confusion_matrix"],
                      most_confident_errors=report["most_confident_errors"], test_images=int(len(y)),
                      inference_images_per_second=round(len(y) / seconds, 1), test_manifest_sha256=test.sha256)


@verified_task(
    task_run_name="evaluate {model.weights_sha256:.12}",
    cache_key_fn=content_key(lambda p: (p["model"].weights_sha256, files_digest(p["model"].dir), p["test"].sha256),
                             code=("nn",)),
    **CACHED,
)
def evaluate(model: TrainedModel, test: SplitRef) -> Evaluation:
    """Accuracy, loss, per-class metrics, confusion matrix, worst errors, throughput."""
    metrics = measure(model, test)
    get_run_logger().info("test accuracy %.4f, loss %.4f, %.0f images/s", metrics.test_accuracy,
                          metrics.test_loss, metrics.inference_images_per_second)
    return metrics


def lineage(train_ref: SplitRef, test_ref: SplitRef, hp: Hyperparameters | None,
            dataset: DatasetLineage | None) -> Lineage:
    from prefect.runtime import flow_run

    return Lineage(
        train_manifest_sha256=train_ref.sha256, test_manifest_sha256=test_ref.sha256,
        git_commit=git_commit(), package_version=package_version(), nn_source_sha256=code_version("nn"),
        python=platform.python_version(), numpy=np.__version__, seed=hp.seed if hp else None,
        prefect_flow_run_id=_root_run_id(flow_run), created=now(),
        dataset=dataset if dataset and dataset.name != "mnist" else None,  # MNIST's lineage stays as it was: digits
    )


ROOT_RUN_WAIT = 5.0  # seconds the lineage waits for the API to name the root run (under the registry lock)


def _root_run_id(flow_run) -> str | None:
    """The run the user started (``retrain``, whose dashboard link the CLI printed; ``publish``
    when run alone), not the publish subflow inside it: two reads of the API, at publish only,
    waited for at most ``ROOT_RUN_WAIT`` s (Prefect's client retries a silent API for minutes,
    and this runs under the registry lock); else the publishing run's own id, still a true answer."""
    import logging

    if not flow_run.id:
        return None

    def look() -> str | None:
        try:
            return str(flow_run.root_flow_run_id)  # (prefect.runtime reads the run from the context)
        except Exception as e:  # the API gone this moment
            logging.getLogger(__name__).debug("root flow run not found: %s", e)
            return None

    found = within(ROOT_RUN_WAIT, look, "digitflow-root-run")
    return found[0] if found and found[0] else str(flow_run.id)


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_version() -> str | None:
    try:
        return importlib_metadata.version("digitflow")
    except importlib_metadata.PackageNotFoundError:
        return None


@verified_task(task_run_name="publish {model.weights_sha256:.12}")
def publish(model: TrainedModel, metrics: Evaluation, train: SplitRef, test: SplitRef, home: Home,
            model_name: str = DEFAULT_NAME, dataset: DatasetLineage | None = None) -> Published:
    """Publish a new immutable version (or find the one with these exact weights). ``dataset``
    (``Dataset.lineage()``: name, key, identity, classes, source) is recorded in the lineage;
    predictions name classes from it; a registry of another dataset's models is refused."""
    log = get_run_logger()
    registry = Home(home).registry(model_name)

    net = load_verified(model)  # only the weights that were trained and evaluated are published
    key = dataset.key if dataset else "mnist"
    recorded = data_checks_of(home, key, train, test)

    def build(folder: Path, version: int) -> dict:  # (under the registry's lock: the champion of this moment)
        champion_version = registry.aliases().champion
        champion = None
        if champion_version is not None and registry.problem(champion_version) is None:
            champion = {"version": champion_version, **registry.metrics(champion_version).model_dump()}
        info = lineage(train, test, model.hyperparameters, dataset)
        full = Metrics(**metrics.model_dump(), history=model.history, best_epoch=model.best_epoch,
                       train_seconds=model.train_seconds)
        return write_version(folder, version, name=model_name, net=net, weights=remote.local(model.dir),
                             metrics=full, hyperparameters=model.hyperparameters, lineage=info, champion=champion,
                             checks=recorded, x_test=load_split(test)[0])

    version, created = registry.publish(model.weights_sha256, build, key)
    path = registry.path(version)
    address = Home(home).address(path)  # in a remote home: the version's URL in the bucket
    if created:
        log.info("published %s v%d at %s", model_name, version, address)
    else:
        log.info("these weights are already %s v%d: nothing new published", model_name, version)
    return Published(name=model_name, version=version, created=created, path=address,
                     test_accuracy=metrics.test_accuracy)


def data_checks_of(home: Home, key: str, *splits: SplitRef) -> dict | None:
    """The data checks recorded at ingest for exactly these splits (their manifests' source files),
    or None when none were recorded for them."""
    home = Home(home)
    record = home.address(home.checks(key))
    try:
        if remote.is_url(record) and remote.remote_file(record) is None:
            return None
        report = checks.load(remote.pull_file(record))
        if report is None:
            return None
        for ref in splits:
            path = remote.pull_file(ref.manifest, ref.sha256)
            if sha256_file(path) != ref.sha256:  # changed since the reference was made: not these splits
                return None
            source = read_json(path)["source"]
            if report.sources.get(ref.split) != {"images": source["images"]["sha256"],
                                                 "labels": source["labels"]["sha256"]}:
                return None
    except (DigitflowError, OSError, ValueError, KeyError, TypeError):
        return None
    return report.to_dict()


def version_artifacts(home: Home, name: str, version: int) -> None:
    """The report, metrics and folder of a version just published, as artifacts of the run that
    calls this (the run the user opened: the top-level one, not its publish subflow), read from
    the registry; the report opens with the gate's decision and why."""
    registry = Home(home).registry(name)
    path, decision = registry.path(version), registry.decision(version)
    metrics = registry.metrics(version).evaluation()
    verdict = {"promoted": "**Promoted to champion**", "rejected": "**Rejected** (the champion is unchanged)"}
    status = decision.status if decision else "undecided"
    head = f"> {verdict.get(status, md(status))}: {md(decision.reason if decision else 'not decided yet')}\n\n"
    report = report_files.embed_figures((path / "report.md").read_text(), path)
    title, _, rest = report.partition("\n")
    create_markdown_artifact(f"{title}\n\n{head}{rest.lstrip()}", key=artifact_key(name, "report"),
                             description=f"{name} v{version} report: {status}")
    create_table_artifact(metrics_table(metrics), key=artifact_key(name, "metrics"),
                          description=f"{name} v{version}: test metrics (overall first, then per class)")
    create_markdown_artifact(card.card_of(registry, version), key=artifact_key(name, "card"),
                             description=f"Model card of {name} v{version}: {status}")
    trend_artifact(registry)
    create_markdown_artifact(
        f"# {name} v{version}\n\n{head}Folder: {md(path)}\n\n(on the machine that published it: "
        f"[{md(path.as_uri())}](<{path.as_uri()}>); `digitflow models show v{version}` prints it)\n",
        key=artifact_key(name, "version"), description=f"Folder of {name} v{version}: {path}")


def trend_artifact(registry) -> None:
    """Accuracy, loss and per-class F1 across every version (champions and rejections marked)."""
    import tempfile

    rows = card.trend(registry)
    if not rows:
        return
    with tempfile.TemporaryDirectory() as tmp:
        figure = Path(tmp) / "trend.png"
        card.plot_trend(rows, figure, registry.classes(rows[-1]["version"]))
        text = report_files.embed_figures(card.trend_markdown(registry.name, rows), Path(tmp))
    create_markdown_artifact(text, key=artifact_key(registry.name, "trend"),
                             description=f"{registry.name}: {len(rows)} versions compared")


def metrics_table(metrics: Evaluation) -> list[dict]:
    """The overall row first (the dashboard pages tables by 10 rows), then one row per class."""
    overall = {"class": "all", "precision": None, "recall": round(metrics.test_accuracy, 4),
               "f1": round(metrics.macro_f1, 4), "support": metrics.test_images}
    return [overall] + [{"class": str(c["class"]), "precision": round(c["precision"], 4),
                         "recall": round(c["recall"], 4), "f1": round(c["f1"], 4), "support": c["support"]}
                        for c in metrics.per_class]


def would_promote(published: Published, home: Home, *, tolerance: float, floor: float) -> bool:
    """Would the gate promote this (still undecided) version now? Nothing is recorded."""
    registry = Home(home).registry(published.name)
    return registry.decision(published.version) is None and \
        registry.preview(published.version, tolerance=tolerance, floor=floor)[0]


@verified_task(task_run_name="gate v{published.version}")
def gate(published: Published, home: Home, floor: float, tolerance: float = DEFAULT_TOLERANCE,
         approval: Answer | None = None) -> Decision:
    """Promote the version to champion if it is at least as good and reaches ``floor`` (the
    dataset's, unless the run gave one); else mark it rejected. With ``approval`` (a person's
    answer or the timeout's), it is promoted only if approved too; the answer is recorded.

    Read, decide and record happen under the registry lock, on verified weights."""
    log = get_run_logger()
    registry = Home(home).registry(published.name)
    version = published.version
    decision, decided_now = registry.decide(version, tolerance=tolerance, floor=floor, approval=approval)
    state = registry.status(version)
    if not decided_now:
        log.info("v%d was decided before: %s (%s); now %s", version, decision.status, decision.reason, state)
    else:
        promote = decision.promoted
        (log.info if promote else log.warning)("v%d %s: %s", version, "promoted to champion" if promote else "rejected",
                                               decision.reason, extra={TOLD_BY_THE_OUTCOME: True})
        if not promote:  # an event server-side automations can react to (`digitflow alerts install`)
            emit_event(event=REJECTED_EVENT, payload={"reason": decision.reason,
                                                      "test_accuracy": published.test_accuracy},
                       resource={"prefect.resource.id": f"digitflow.model.{published.name}.v{version}",
                                 "prefect.resource.name": f"{published.name} v{version}"})
    return Decision(**dict(decision), champion=registry.aliases().champion, decided_now=decided_now, state=state)
