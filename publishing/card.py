"""Model cards and trends: a version described for the people who use it, and every version of
a model side by side. No Prefect.

A card is rendered from the version's own immutable files (metrics, lineage, hyperparameters,
the data checks it was trained behind) plus the registry's decision record, which changes after
publication (the gate, a person's approval or override). ``model_card.md`` is written into the
version folder at publication with the decision as it stood then ("not decided yet"); every view
(``digitflow models card``, the API's ``GET /model/card``, the dashboard) renders it anew with the
current decision. Every text from a spec, a lineage or a person is escaped (``storage.text.md``).
"""

from __future__ import annotations

from pathlib import Path

from nn.presets import Hyperparameters
from storage.records import NOT_RECORDED, Verdict
from storage.text import md

CARD = "model_card.md"
DATA_CHECKS = "data_checks.json"  # the data checks a version was trained behind, copied at publication
WEAKEST, PAIRS = 3, 3


def confusable_pairs(cm: list[list[int]], top: int = PAIRS) -> list[tuple[int, int, int]]:
    """The most frequent (true, predicted, count) mistakes, largest first."""
    pairs = [(i, j, n) for i, row in enumerate(cm) for j, n in enumerate(row) if i != j and n > 0]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:top]


def weakest_classes(per_class: list[dict], top: int = WEAKEST) -> list[dict]:
    return sorted(per_class, key=lambda c: (c["f1"], c["class"]))[:top]


def decision_lines(decision: Verdict | None) -> list[str]:
    """Who decided what, when and why: the current decision first, then earlier ones."""
    if not decision:
        return ["Not decided yet: the gate decides after publication (`digitflow models card` shows it then)."]
    lines = []
    for d in [decision, *reversed(decision.history)]:
        verb = "Promoted to champion" if d.promoted else "Rejected"
        lines.append(f"- {verb} by {md(d.by)} at {md(d.at)}: {md(d.reason)}")
        if d.replaced_damaged is not None:
            lines.append(f"- A damaged decision record was replaced; it read: {md(d.replaced_damaged)}")
    lines[0] = lines[0].replace("- ", "- **Now:** ", 1)
    return lines


def render(*, name: str, version: int, metrics: dict, lineage: dict, hyperparameters: Hyperparameters | None,
           classes: list[str],
           checks: dict | None, decision: Verdict | None, floor: float | None = None) -> str:
    """model_card.md of one version."""
    def named(c: int) -> str:
        return f"{c} ({md(classes[c])})" if classes[c] != str(c) else str(c)

    raw_name = str((lineage.get("dataset") or {}).get("name", "mnist"))
    data_name = md(raw_name)
    shape = "28×28" if raw_name in ("mnist", "fashion-mnist") else "its spec's"
    out = [f"# Model card: {md(name)} v{version}", ""]
    out += ["## Decision", "", *decision_lines(decision), ""]
    out += ["## Intended use", "",
            f"Classifies single {shape} grayscale images of the {data_name} dataset into {len(classes)} classes "
            f"({', '.join(md(c) for c in classes[:12])}{', …' if len(classes) > 12 else ''}): centred, "
            "white ink on black, scaled to [0, 1] as the dataset's are (the API and `digitflow predict` prepare "
            "other images that way). For demonstrations, teaching and pipelines that check its answers; not for "
            "decisions about people.", ""]
    out += ["## Data", "",
            f"Trained on the `train` split of {data_name}, evaluated on its `test` split "
            f"({metrics.get('test_images', '?'):,} images; manifests "
            f"{md(str(lineage.get('train_manifest_sha256', '?'))[:12])}… and "
            f"{md(str(lineage.get('test_manifest_sha256', '?'))[:12])}…).", ""]
    if checks:
        rows = checks.get("checks", [])
        worst = [c for c in rows if c.get("status") != "pass"]
        out.append(f"Data checks at ingest: **{md(checks.get('status'))}** ({len(rows) - len(worst)} of {len(rows)} "
                   "passed)." + ("" if worst else " Rows, class counts, pixel statistics, duplicate, empty and "
                                                  "shared images all as expected."))
        if worst:
            out += ["", "| split | check | value | expected | status |", "|---|---|---|---|---|"]
            out += [f"| {md(c.get('split'))} | {md(c.get('name'))} | {md(c.get('value'))} | "
                    f"{md(c.get('expectation'))} | {md(c.get('status'))} |" for c in worst]
    else:
        out.append("No data checks were recorded for this version's data.")
    out += ["", "## Metrics (test split)", "",
            f"Accuracy **{metrics['test_accuracy']:.4f}**, loss {metrics['test_loss']:.4f}, macro F1 "
            f"{metrics['macro_f1']:.4f}.", "", "Weakest classes (lowest F1):", ""]
    out += [f"- {named(c['class'])}: F1 {c['f1']:.4f} (precision {c['precision']:.4f}, recall {c['recall']:.4f}, "
            f"{c['support']} images)" for c in weakest_classes(metrics["per_class"])]
    out += ["", "Most confused pairs (true → predicted, of the test images):", ""]
    out += [f"- {named(i)} → {named(j)}: {n} images" for i, j, n in confusable_pairs(metrics["confusion_matrix"])]
    out += ["", "## Limitations", "",
            f"- Measured on {data_name}'s test split only; accuracy on images from other sources (photos, other "
            "pens, other scanners) is unknown and usually lower.",
            "- A multilayer perceptron on raw pixels: no built-in invariance to shifts, rotation or scale; "
            "off-centre or inverted images are misread.",
            "- Its probabilities are not calibrated: a confident answer can still be wrong (see the report's "
            "most confidently wrong images).",
            f"- Promotion needs test accuracy at or above the floor{f' ({floor:.2f})' if floor is not None else ''} "
            "and the champion's; it says nothing about classes the data lacks."]
    out += ["", "## Hyperparameters", "", ", ".join(f"{md(k)} = {md(v)}" for k, v in hyperparameters.to_dict().items())
            if hyperparameters else NOT_RECORDED, ""]
    out += ["## Lineage", "", "| what | value |", "|---|---|"]
    out += [f"| {md(k)} | {md(v)} |" for k, v in lineage.items() if k != "dataset"]
    return "\n".join(out) + "\n"


def card_of(registry, version: int, floor: float | None = None) -> str:
    """The card of a registry version with its current decision."""
    from storage.atomic import read_json

    folder = Path(registry.path(version))
    try:
        checks = read_json(folder / DATA_CHECKS)
    except (OSError, ValueError):
        checks = None
    meta = registry.metadata(version)
    return render(name=registry.name, version=version, metrics=registry.metrics(version).model_dump(),
                  lineage=meta.lineage.record(), hyperparameters=meta.hyperparameters,
                  classes=registry.classes(version), checks=checks if isinstance(checks, dict) else None,
                  decision=registry.decision(version), floor=floor)


# ---- trends --------------------------------------------------------------------------------

def trend(registry) -> list[dict]:
    """Every intact version's headline metrics and standing, oldest first."""
    aliases = registry.aliases()
    rows = []
    for v in registry.intact_versions():
        metrics, decision = registry.metrics(v), registry.decision(v)
        rows.append({"version": v, "created": registry.metadata(v).created,
                     "test_accuracy": metrics.test_accuracy, "test_loss": metrics.test_loss,
                     "macro_f1": metrics.macro_f1, "per_class_f1": [round(c["f1"], 4) for c in metrics.per_class],
                     "status": registry.status(v, aliases), "decision": decision and decision.status,
                     "decided_by": decision and decision.by, "reason": decision and decision.reason})
    return rows


def plot_trend(rows: list[dict], path: Path, classes: list[str] | None = None) -> None:
    """Accuracy and loss across versions (champions ★, rejections ✗) and per-class F1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    versions = [r["version"] for r in rows]
    fig, (ax_acc, ax_loss, ax_f1) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, key, title in ((ax_acc, "test_accuracy", "Test accuracy"), (ax_loss, "test_loss", "Test loss")):
        ax.plot(versions, [r[key] for r in rows], "-", color="0.6")
        for marker, want, label in (("*", "promoted", "promoted"), ("x", "rejected", "rejected"), ("o", None, "undecided")):
            pts = [(r["version"], r[key]) for r in rows if r["decision"] == want]
            if pts:
                ax.plot(*zip(*pts), marker, markersize=11 if marker == "*" else 7, label=label, linestyle="none")
        champ = [(r["version"], r[key]) for r in rows if r["status"] == "champion"]
        if champ:
            ax.plot(*zip(*champ), "o", markersize=16, fillstyle="none", color="black", label="champion now")
        ax.set(xlabel="version", title=title)
        ax.set_xticks(versions)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    f1 = np.array([r["per_class_f1"] for r in rows]).T if rows else np.zeros((1, 1))
    im = ax_f1.imshow(f1, aspect="auto", cmap="RdYlGn", vmin=max(0.0, float(f1.min()) - 0.01), vmax=1.0)
    ax_f1.set(xlabel="version", ylabel="class", title="F1 per class", xticks=range(len(versions)),
              xticklabels=versions, yticks=range(f1.shape[0]))
    if classes and classes != [str(i) for i in range(len(classes))]:
        ax_f1.set_yticklabels([c.replace("$", r"\$") for c in classes], fontsize=7)
    fig.colorbar(im, ax=ax_f1)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def trend_markdown(name: str, rows: list[dict], figure: str = "trend.png") -> str:
    lines = [f"# {md(name)}: versions", "", f"![trend]({figure})", "",
             "| version | created | accuracy | loss | macro F1 | status | decided by | reason |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| v{r['version']} | {md(r['created'])} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | "
              f"{r['macro_f1']:.4f} | {md(r['status'])} | {md(r['decided_by'] or '')} | {md(r['reason'] or '')} |"
              for r in rows]
    return "\n".join(lines) + "\n"
