"""Classification metrics from labels and predicted probabilities. NumPy only."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class(cm: np.ndarray) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return [{"class": c, "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
             "support": int(actual[c])} for c in range(len(cm))]


def classification_report(y_true: np.ndarray, proba: np.ndarray, *, worst: int = 20) -> dict:
    """Accuracy, loss, per-class metrics, confusion matrix and the most confidently wrong examples."""
    y_true = np.asarray(y_true, np.intp)
    pred = proba.argmax(axis=1)
    p_true = np.clip(proba[np.arange(len(y_true)), y_true].astype(np.float64), 1e-12, 1.0)
    cm = confusion_matrix(y_true, pred, proba.shape[1])
    wrong = np.flatnonzero(pred != y_true)
    confidence = proba[wrong, pred[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:worst]
    classes = per_class(cm)
    return {
        "accuracy": float(np.mean(pred == y_true)),
        "loss": float(-np.mean(np.log(p_true))),
        "macro_f1": float(np.mean([c["f1"] for c in classes])),
        "per_class": classes,
        "confusion_matrix": cm.tolist(),
        "most_confident_errors": [
            {"index": int(i), "label": int(y_true[i]), "predicted": int(pred[i]),
             "probability": float(proba[i, pred[i]]), "probability_of_label": float(proba[i, y_true[i]])}
            for i in order],
    }
