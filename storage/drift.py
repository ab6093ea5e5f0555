"""Drift: what a served model is asked, compared with what it was tested on. No Prefect.

Four statistics describe each image a model answers, without keeping the image:

    intensity    mean of its pixels (pixel/255)            MNIST test: ~0.13; inverted: ~0.87
    ink          fraction of its pixels above 0.5          MNIST test: ~0.13; noise: ~0.5
    confidence   the model's highest probability
    label        the predicted class

A version's reference is their distribution on the test split, recorded at publication
(``drift_reference.json``: histograms over fixed bins). The API keeps the same four numbers of
the last ``size`` images it answered (a ring buffer: a few numbers per image, no pixels), and
compares: the population stability index (PSI) per statistic, and for the three continuous ones
the Kolmogorov–Smirnov distance between the binned distributions. A PSI above 0.25 is the
conventional "significant shift"; below ``MIN_IMAGES`` images nothing is judged.
"""

from __future__ import annotations

import threading

import numpy as np

BINS = 20                       # equal-width bins over [0, 1] for the continuous statistics
CONTINUOUS = ("intensity", "ink", "confidence")
STATISTICS = (*CONTINUOUS, "label")
PSI_THRESHOLD = 0.25
MIN_IMAGES = 100
WINDOW = 2000                   # images the API remembers (four numbers each)
EPS = 1e-4                      # floor of a bin's share in the PSI (an empty bin is not infinitely surprising)
REFERENCE = "drift_reference.json"


def features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intensity, ink) of each image of ``x`` [n, pixels] in 0..1."""
    return x.mean(axis=1, dtype=np.float64).astype(np.float32), (x > 0.5).mean(axis=1, dtype=np.float32)


def histogram(values: np.ndarray) -> list[float]:
    """Shares of ``values`` (in 0..1) in BINS equal bins."""
    counts = np.bincount(np.clip((np.asarray(values) * BINS).astype(np.int64), 0, BINS - 1), minlength=BINS)
    return (counts / max(len(values), 1)).round(6).tolist()


def label_shares(labels: np.ndarray, classes: int) -> list[float]:
    return (np.bincount(np.asarray(labels, np.int64), minlength=classes)[:classes] / max(len(labels), 1)).round(6).tolist()


def reference(x: np.ndarray, proba: np.ndarray) -> dict:
    """The reference of a version: its test images ``x`` and the probabilities it gave them."""
    intensity, ink = features(x)
    return {"images": int(len(x)), "bins": BINS,
            "intensity": histogram(intensity), "ink": histogram(ink),
            "confidence": histogram(proba.max(axis=1)), "label": label_shares(proba.argmax(axis=1), proba.shape[1])}


def check_reference(doc, classes: int) -> dict:
    """A reference read back from a version folder: every field typed, shares in 0..1."""
    if not isinstance(doc, dict) or doc.get("bins") != BINS or type(doc.get("images")) is not int:
        raise ValueError("not a drift reference")
    for name in STATISTICS:
        shares = doc.get(name)
        n = classes if name == "label" else BINS
        if not (isinstance(shares, list) and len(shares) == n
                and all(type(s) in (int, float) and 0 <= s <= 1 for s in shares)):
            raise ValueError(f"drift reference: {name} is not {n} shares")
    return doc


def psi(expected: list[float], actual: list[float]) -> float:
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    a = np.maximum(np.asarray(actual, np.float64), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(expected: list[float], actual: list[float]) -> float:
    """Largest gap between the two cumulative distributions (at the bin edges)."""
    return float(np.max(np.abs(np.cumsum(expected) - np.cumsum(actual)))) if expected else 0.0


class Window:
    """The last ``size`` images' statistics (thread-safe; appending costs a few slice copies)."""

    def __init__(self, size: int = WINDOW):
        self.size = size
        self.values = np.zeros((len(STATISTICS), size), np.float32)
        self.count = 0          # images seen since the window started (for the ring position)
        self.lock = threading.Lock()

    def add(self, x: np.ndarray, proba: np.ndarray) -> None:
        n = min(len(x), self.size)
        x, proba = x[-n:], proba[-n:]
        with self.lock:
            start = self.count % self.size
            end = start + n
            if end <= self.size:  # the common case: one slice of the ring, written in place
                v = self.values[:, start:end]
                np.mean(x, axis=1, out=v[0])
                v[1] = np.count_nonzero(x > 0.5, axis=1) / x.shape[1]
                np.max(proba, axis=1, out=v[2])
                v[3] = np.argmax(proba, axis=1)
            else:
                self._split_add(x, proba, start, self.size - start)
            self.count += n

    def _split_add(self, x, proba, start: int, first: int) -> None:
        intensity, ink = features(x)
        rows = np.stack([intensity, ink, proba.max(axis=1), proba.argmax(axis=1).astype(np.float32)])
        self.values[:, start:] = rows[:, :first]
        self.values[:, :rows.shape[1] - first] = rows[:, first:]

    def clear(self) -> None:
        with self.lock:
            self.count = 0

    def current(self) -> np.ndarray:
        with self.lock:
            return self.values[:, :min(self.count, self.size)].copy()

    def report(self, ref: dict | None, classes: int, threshold: float = PSI_THRESHOLD,
               min_images: int = MIN_IMAGES) -> dict:
        """The window's distributions, and their distance from ``ref`` (None: not compared)."""
        values = self.current()
        n = values.shape[1]
        window = {name: histogram(values[i]) for i, name in enumerate(CONTINUOUS)}
        window["label"] = label_shares(values[3].astype(np.int64), classes)
        stats = {}
        for name in STATISTICS:
            entry = {"window": window[name]}
            if ref is not None:
                entry["reference"] = ref[name]
                entry["psi"] = round(psi(ref[name], window[name]), 4) if n else None
                if name in CONTINUOUS:
                    entry["ks"] = round(ks(ref[name], window[name]), 4) if n else None
                entry["drifted"] = bool(n >= min_images and entry["psi"] is not None and entry["psi"] > threshold)
            stats[name] = entry
        judged = ref is not None and n >= min_images
        return {"window_images": n, "window_size": self.size, "min_images": min_images, "threshold": threshold,
                "compared": ref is not None, "drifted": (any(s["drifted"] for s in stats.values()) if judged else None),
                "statistics": stats}
