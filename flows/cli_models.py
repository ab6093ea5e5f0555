"""`digitflow models ...`: the registry from the command line (no Prefect needed)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from flows.cli_common import DATASET, HOME, MODEL_NAME, one_line_errors
from storage.config import resolve_home
from storage.catalog import dataset_and_model
from storage.registry import Registry
from storage.text import terminal

app = typer.Typer(add_completion=False, no_args_is_help=True, help="List, inspect, compare, promote and export versions.")
JSON = typer.Option(False, "--json", help="Machine-readable output.")


def _registry(home, name, dataset="mnist") -> Registry:
    """The registry of ``--model-name`` (default: the dataset's model, mnist-mlp for MNIST)."""
    return resolve_home(home, existing=True).registry(dataset_and_model(dataset, name)[1])


def listing(registry: Registry) -> list[dict]:
    aliases = registry.aliases()
    rows = []
    for v in registry.versions():
        meta = registry.metadata(v) if registry.problem(v) is None else None
        decision = registry.decision(v)
        rows.append({"version": v, "created": meta and meta.created, "test_accuracy": meta and meta.test_accuracy,
                     "aliases": aliases.names_of(v), "status": registry.status(v, aliases),
                     "reason": decision and decision.reason})
    return rows


@app.command("list")
def list_(home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET, json_out: bool = JSON) -> None:
    """Versions with creation time, test accuracy, aliases and gate status."""
    with one_line_errors():
        registry = _registry(home, model_name, dataset)
        rows = listing(registry)
    model_name = registry.name
    if json_out:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no versions of {model_name} yet")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{model_name}")
    for col in ("version", "created", "test accuracy", "aliases", "status"):
        table.add_column(col)
    for r in rows:
        status = r["status"] + (f": {r['reason']}" if r["status"] == "rejected" else "")
        accuracy = f"{r['test_accuracy']:.4f}" if isinstance(r["test_accuracy"], (int, float)) else "?"
        table.add_row(*(escape(terminal(cell)) for cell in (f"v{r['version']}", r["created"] or "", accuracy,
                                                            ", ".join(r["aliases"]), status)))
    Console(width=160).print(table)
    if registry.aliases_problem():
        typer.echo(f"note: {registry.aliases_problem()}; aliases shown as the versions and decisions imply "
                   "(the next publish rewrites aliases.json)")


@app.command()
def show(ref: str = typer.Argument(..., help="VERSION or alias."), home: Optional[str] = HOME,
         model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET, json_out: bool = JSON) -> None:
    """A version's metrics, lineage and gate decision."""
    with one_line_errors():
        reg = _registry(home, model_name, dataset)
        v = reg.resolve(ref)
        metrics, decision = reg.metrics(v), reg.decision(v)
        info = {"version": v, "path": str(reg.path(v)), "status": reg.status(v),
                "decision": decision and decision.model_dump(mode="json"),
                "metadata": {**reg.metadata(v).model_dump(mode="json"), "lineage": reg.metadata(v).lineage.record()},
                "metrics": metrics.model_dump(mode="json", include={"test_accuracy", "test_loss", "macro_f1", "per_class",
                                                                    "inference_images_per_second"})}
    if json_out:
        typer.echo(json.dumps(info))
        return
    m, meta = info["metrics"], info["metadata"]
    typer.echo(f"{reg.name} v{v} — {info['status']}  ({terminal(info['path'])})")
    typer.echo(f"  test accuracy {m['test_accuracy']:.4f}  loss {m['test_loss']:.4f}  macro F1 {m['macro_f1']:.4f}")
    if info["decision"]:
        d = info["decision"]
        typer.echo(terminal(f"  gate: {d['status']} by {d['by']} at {d['at']}: {d['reason']}"))
    typer.echo(terminal("  hyperparameters: " + (", ".join(f"{k}={v}" for k, v in meta["hyperparameters"].items())
                                                 if meta.get("hyperparameters") else "not recorded")))
    typer.echo("  lineage:")
    for k, val in meta.get("lineage", {}).items():
        typer.echo(terminal(f"    {k}: {val}"))


@app.command()
def promote(version: str = typer.Argument(..., help="VERSION to make champion."),
            reason: str = typer.Option(..., "--reason", help="Why the gate is overridden (recorded)."),
            by: Optional[str] = typer.Option(None, "--by", help="Who (default: the current user)."),
            home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET) -> None:
    """Manually make VERSION the champion, overriding the gate; who/when/why are recorded."""
    with one_line_errors():
        registry = _registry(home, model_name, dataset)
        decision = registry.promote(version, reason=reason, by=by)
    model_name = registry.name
    typer.echo(f"{model_name} v{decision.version} is champion (was "
               f"{'v%d' % decision.champion_before if decision.champion_before else 'none'}); "
               f"recorded: by {decision.by} at {decision.at}")


def diff_versions(reg: Registry, a: int, b: int) -> dict:
    ma, mb = reg.metrics(a), reg.metrics(b)
    summary = {k: {"a": getattr(ma, k), "b": getattr(mb, k), "delta": getattr(mb, k) - getattr(ma, k)}
               for k in ("test_accuracy", "test_loss", "macro_f1")}
    per_class = [{"class": ca["class"], **{f"{k}_delta": cb[k] - ca[k] for k in ("precision", "recall", "f1")}}
                 for ca, cb in zip(ma.per_class, mb.per_class)]
    cm = [[y - x for x, y in zip(ra, rb)] for ra, rb in zip(ma.confusion_matrix, mb.confusion_matrix)]
    return {"a": a, "b": b, "summary": summary, "per_class": per_class, "confusion_matrix_delta": cm}


@app.command()
def diff(a: str = typer.Argument(..., help="VERSION or alias."), b: str = typer.Argument(..., help="VERSION or alias."),
         home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET, json_out: bool = JSON) -> None:
    """Metrics side by side, per-class deltas and the confusion-matrix change (B − A)."""
    with one_line_errors():
        reg = _registry(home, model_name, dataset)
        d = diff_versions(reg, reg.resolve(a), reg.resolve(b))
    if json_out:
        typer.echo(json.dumps(d))
        return
    typer.echo(f"{'':16s}{'v%d' % d['a']:>10s}{'v%d' % d['b']:>10s}{'change':>10s}")
    for k, s in d["summary"].items():
        typer.echo(f"{k:16s}{s['a']:10.4f}{s['b']:10.4f}{s['delta']:+10.4f}")
    typer.echo("\nper class    Δprecision   Δrecall       ΔF1")
    for c in d["per_class"]:
        typer.echo(f"  {c['class']:<9d}{c['precision_delta']:+11.4f}{c['recall_delta']:+10.4f}{c['f1_delta']:+10.4f}")
    typer.echo("\nconfusion matrix change (rows true, columns predicted; B − A):")
    typer.echo("      " + "".join(f"{j:>6d}" for j in range(10)))
    for i, row in enumerate(d["confusion_matrix_delta"]):
        typer.echo(f"  {i:>2d}  " + "".join(f"{x:>+6d}" if x else f"{'.':>6s}" for x in row))


@app.command()
def export(ref: str = typer.Argument(..., help="VERSION or alias."),
           onnx_file: str = typer.Option(..., "--onnx", help="Where to write the ONNX model."),
           home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET) -> None:
    """Export a version as ONNX (Gemm/Relu/…/Softmax), verified in onnxruntime against NumPy.

    Needs the optional extra: pip install 'digitflow[onnx]'."""
    from publishing.onnx import export_onnx

    with one_line_errors():
        reg = _registry(home, model_name, dataset)
        v = reg.resolve(ref)
        reg.load_model(v)  # only the weights that were published are exported
        result = export_onnx(reg.path(v), onnx_file)
    typer.echo(f"wrote {onnx_file}: {reg.name} v{v}, max |onnxruntime − numpy| = {result['max_abs_diff']:.2e} "
               f"on {result['checked']} inputs")


@app.command()
def card(ref: str = typer.Argument("champion", help="VERSION or alias."), home: Optional[str] = HOME,
         model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET) -> None:
    """A version's model card (Markdown): intended use, data and its checks, metrics and weaknesses,
    limitations, lineage, and who decided what about it."""
    from publishing.card import card_of

    with one_line_errors():
        reg = _registry(home, model_name, dataset)
        text = card_of(reg, reg.resolve(ref))
    typer.echo("\n".join(map(terminal, text.rstrip("\n").split("\n"))))  # each line inert on a terminal


@app.command()
def trend(home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET,
          json_out: bool = JSON,
          plot: Optional[str] = typer.Option(None, "--plot", help="Also draw the chart into this PNG file.")) -> None:
    """Accuracy, loss and per-class F1 across versions, with champions and rejections."""
    from storage.atomic import atomic_path, output_path
    from publishing.card import plot_trend, trend as trend_rows

    with one_line_errors():
        reg = _registry(home, model_name, dataset)
        rows = trend_rows(reg)
        if plot and rows:
            with atomic_path(output_path(plot)) as target:
                plot_trend(rows, target, reg.classes(rows[-1]["version"]))
    if json_out:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"{reg.name}: no versions yet")
        return
    best = max(r["test_accuracy"] for r in rows)
    low = min(r["test_accuracy"] for r in rows)
    for r in rows:
        bar = "█" * (1 + round(19 * (r["test_accuracy"] - low) / (best - low))) if best > low else "█" * 20
        worst = min(range(len(r["per_class_f1"])), key=r["per_class_f1"].__getitem__)
        mark = {"promoted": "★", "rejected": "✗"}.get(r["decision"], "·")
        typer.echo(terminal(f"{mark} v{r['version']:<4} {r['test_accuracy']:.4f} {bar:<20}  loss {r['test_loss']:.4f}  "
                            f"F1 {r['macro_f1']:.4f} (weakest class {worst}: {r['per_class_f1'][worst]:.4f})  "
                            f"{r['status']}"))
    if plot:
        typer.echo(f"chart: {terminal(plot)}")


def _answer(version: str, approve: bool, reason: str, by: Optional[str], home, model_name, dataset) -> None:
    """Answer the run waiting for approval of VERSION, as the dashboard's Resume form does."""
    import getpass

    from flows import server
    from flows.approval import answer

    with one_line_errors():
        registry = _registry(home, model_name, dataset)
        v = registry.resolve(version)
        server.use(start_if_down=False)  # the server the waiting run reports to (never a new one)
        run_id = answer(registry.name, v, approve=approve, reason=reason, by=by or getpass.getuser())
    typer.echo(f"{registry.name} v{v}: {'approved' if approve else 'rejected'}; the waiting run ({run_id}) "
               "records the decision now")


@app.command()
def approve(version: str = typer.Argument(..., help="VERSION waiting for approval."),
            reason: str = typer.Option(..., "--reason", help="Why (recorded with the decision)."),
            by: Optional[str] = typer.Option(None, "--by", help="Who (default: the current user)."),
            home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET) -> None:
    """Approve a version waiting for a person (`--approval required`): it becomes champion if the
    gate, asked again now, still promotes it."""
    _answer(version, True, reason, by, home, model_name, dataset)


@app.command()
def reject(version: str = typer.Argument(..., help="VERSION waiting for approval."),
           reason: str = typer.Option(..., "--reason", help="Why (recorded with the decision)."),
           by: Optional[str] = typer.Option(None, "--by", help="Who (default: the current user)."),
           home: Optional[str] = HOME, model_name: Optional[str] = MODEL_NAME, dataset: str = DATASET) -> None:
    """Reject a version waiting for a person: the champion stays where it is."""
    _answer(version, False, reason, by, home, model_name, dataset)
