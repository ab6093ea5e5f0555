"""What a user sees in the Prefect dashboard, in a real browser: Debian's Chromium driven by
Playwright, against a real `prefect server start` (UI on)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prefect_helpers import client_for

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: the test command installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_report_artifact_images_render_in_the_dashboard(server, mnist_server, tmp_path, browser):
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--home", str(home), "--mirror", mnist_server,
                        "--preset", "fast", "--model-name", "browser-model"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PREFECT_API_URL": server}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client_for(server) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["browser-model-report"])))
    ui = server.removesuffix("/api")
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(f"{ui}/artifacts/artifact/{artifact.id}", wait_until="networkidle", timeout=60_000)
        page.wait_for_function("Array.from(document.images).filter(i => i.src.startsWith('data:image/png')"
                               " && i.complete && i.naturalWidth > 0).length >= 2", timeout=60_000)
        widths = page.evaluate("Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
                               ".map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
        page.screenshot(path=str(tmp_path / "report-artifact.png"), full_page=True)
    finally:
        page.close()
    assert sorted(w[0] for w in widths) == ["confusion matrix", "learning curves"]
    assert all(w > 100 and h > 100 for _, w, h in widths)
    assert "# browser-model v1" in artifact.data
