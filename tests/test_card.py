"""Model cards and trends over a real published MNIST model: the card written at publication,
rendered with the decisions as they stand now (the gate's, then a person's), text from people
escaped; `models trend` over three versions, as text, JSON and a chart."""

from __future__ import annotations

import json

from publishing.card import DATA_CHECKS, card_of, confusable_pairs, trend
from storage.registry import Registry
from tests.test_operate import cli, second_version


def test_the_card_of_a_published_version(published):
    folder = Registry(published).path(1)
    written = (folder / "model_card.md").read_text()
    assert written.startswith("# Model card: mnist-mlp v1\n\n## Decision\n\nNot decided yet")
    for section in ("## Intended use", "## Data", "## Metrics (test split)", "## Limitations", "## Lineage"):
        assert section in written
    # It was trained behind passing data checks, copied into the version at publication.
    checks = json.loads((folder / DATA_CHECKS).read_text())
    assert checks["status"] == "pass" and len(checks["checks"]) == 15
    assert "Data checks at ingest: **pass** (15 of 15 passed)" in written
    metrics = Registry(published).metrics(1)
    (i, j, n), *_ = confusable_pairs(metrics.confusion_matrix)
    assert f"- {i} → {j}: {n} images" in written
    # Rendered now: with the gate's decision.
    now = card_of(Registry(published), 1)
    assert "- **Now:** Promoted to champion by gate at " in now


def test_a_persons_decision_is_on_the_card_escaped(published):
    second_version(published)
    reason = "looks <b>fine</b> | ![x](http://evil.example/p.png)\n# injected"
    cli("models", "promote", "2", "--reason", reason, "--by", "ana", "--home", str(published))
    text = cli("models", "card", "2", "--home", str(published)).stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Now:**"))
    assert line.startswith("- **Now:** Promoted to champion by ana at ")
    assert "<b>" not in text and "![x](http" not in text and "\n# injected" not in text
    assert line.endswith("looks \\<b\\>fine\\</b\\> \\| \\!\\[x\\](http://evil.example/p.png) \\# injected")


def test_trend_over_three_versions(published, tmp_path):
    second_version(published)                               # v2: 0.01 worse than v1
    second_version(published, accuracy_delta=0.002, shift=0.02)
    registry = Registry(published)
    registry.decide(2, tolerance=0.0, floor=0.0)
    registry.decide(3, tolerance=0.0, floor=0.0)
    rows = json.loads(cli("models", "trend", "--home", str(published), "--json").stdout)
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["decision"] for r in rows] == ["promoted", "rejected", "promoted"]
    assert [r["status"] for r in rows] == ["former champion", "rejected", "champion"]
    assert rows == trend(registry)
    assert all(len(r["per_class_f1"]) == 10 for r in rows)
    chart = tmp_path / "trend.png"
    out = cli("models", "trend", "--home", str(published), "--plot", str(chart)).stdout.splitlines()
    assert [ln[0] for ln in out[:3]] == ["★", "✗", "★"] and out[-1] == f"chart: {chart}"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    bad = cli("models", "trend", "--home", str(published), "--plot", str(tmp_path), check=False)
    assert bad.returncode == 1 and "is a folder" in bad.stderr
