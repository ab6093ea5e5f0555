"""The human-readable side of a model version: report.md and its PNG figures. No Prefect.

Figures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

from nn.presets import Hyperparameters
from storage.records import NOT_RECORDED
from storage.text import md


def plot_learning_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if history and "val_loss" in history[0]:
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    if history and "val_accuracy" in history[0]:
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion_matrix(cm: list[list[int]], path: Path, classes: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6, 5.2), dpi=100)
    shown = np.log1p(cm)
    im = ax.imshow(shown, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > shown.max() * 0.6 else "black")
    ax.set(xticks=range(cm.shape[1]), yticks=range(cm.shape[0]), xlabel="predicted", ylabel="true",
           title="Confusion matrix (test)")
    if classes:
        labels = [c.replace("$", r"\$") for c in classes]  # plain text, never mathtext
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_markdown(*, name: str, version: int, metrics: dict, hyperparameters: Hyperparameters | None, lineage: dict,
                    champion: dict | None, classes: list[str] | None = None) -> str:
    """report.md: what was trained on what, how it did, and how it compares with the champion.
    ``classes`` names the classes (MNIST's are their digits: no names column). Text from the
    spec or the lineage is escaped (``storage.text.md``): it cannot add markup to the report."""
    def named(c: int) -> str:
        return f"{c} {md(classes[c])}" if classes else str(c)

    acc = metrics["test_accuracy"]
    lines = [f"# {md(name)} v{version}", "",
             f"Test accuracy **{acc:.4f}**, test loss {metrics['test_loss']:.4f}, "
             f"macro F1 {metrics['macro_f1']:.4f}, inference {metrics['inference_images_per_second']:,.0f} images/s.", ""]
    lines += ["## Compared with the champion", ""]
    if champion is None:
        lines.append("There was no champion when this version was published.")
    else:
        delta = acc - champion["test_accuracy"]
        lines += ["| | this version | champion v%d | change |" % champion["version"], "|---|---|---|---|",
                  f"| test accuracy | {acc:.4f} | {champion['test_accuracy']:.4f} | {delta:+.4f} |",
                  f"| test loss | {metrics['test_loss']:.4f} | {champion['test_loss']:.4f} | "
                  f"{metrics['test_loss'] - champion['test_loss']:+.4f} |"]
    lines += ["", "## Hyperparameters", ""]
    if hyperparameters is None:
        lines.append(NOT_RECORDED)
    else:
        lines += ["| name | value |", "|---|---|"]
        lines += [f"| {md(k)} | {md(v)} |" for k, v in hyperparameters.to_dict().items()]
    lines += ["", "## Per class (test)", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {named(c['class'])} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
              for c in metrics["per_class"]]
    lines += ["", "## Learning curves", "", "![learning curves](learning_curves.png)", "",
              "| epoch | lr | train loss | train acc | val loss | val acc | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['lr']:.4g} | {h['train_loss']:.4f} | {h['train_accuracy']:.4f} | "
              f"{h.get('val_loss', float('nan')):.4f} | {h.get('val_accuracy', float('nan')):.4f} | {h['seconds']:.2f} |"
              for h in metrics["history"]]
    lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)", "",
              "| true \\ predicted | " + " | ".join(map(str, range(len(metrics["confusion_matrix"])))) + " |",
              "|---" * (len(metrics["confusion_matrix"]) + 1) + "|"]
    lines += [f"| **{named(i)}** | " + " | ".join(map(str, row)) + " |"
              for i, row in enumerate(metrics["confusion_matrix"])]
    lines += ["", "## Most confidently wrong (test)", "", "| test index | label | predicted | probability |",
              "|---|---|---|---|"]
    lines += [f"| {e['index']} | {named(e['label'])} | {named(e['predicted'])} | {e['probability']:.4f} |"
              for e in metrics["most_confident_errors"][:10]]
    lines += ["", "## Lineage", "", "| what | value |", "|---|---|"]
    lines += [f"| {md(k)} | {md(v)} |" for k, v in lineage.items()]
    return "\n".join(lines) + "\n"


def embed_figures(markdown: str, folder: Path) -> str:
    """report.md with its figures inlined as ``data:image/png;base64,`` URIs, for viewers (the
    Prefect dashboard) that would resolve ``learning_curves.png`` against their own URL."""
    import base64
    import re

    def inline(match: re.Match) -> str:
        png = folder / match.group(2)
        if not png.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([A-Za-z0-9_.-]+\.png)\)", inline, markdown)
