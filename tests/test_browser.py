"""What a user sees in the Prefect dashboard, in a real browser: Debian's Chromium driven by
Playwright, against a real `prefect server start` (UI on)."""

from __future__ import annotations

import concurrent.futures
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

    # The run the user opens from the dashboard link: its Task Runs tab lists the train task
    # (it said "No task runs" when that task's input was a subflow's result), and the report
    # hangs off it too.
    run_id = next(line for line in r.stderr.splitlines() if line.startswith("dashboard: ")).rsplit("/", 1)[1]
    assert artifact.flow_run_id is not None and str(artifact.flow_run_id) == run_id
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="networkidle", timeout=60_000)
        page.click("#task-runs")  # the tab (an li, not role=tab)
        page.get_by_text("train [128], 3 epochs").first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "task-runs-tab.png"), full_page=True)
    finally:
        page.close()
    assert "No task runs" not in text and "train [128], 3 epochs" in text


def test_drawing_page_predicts_a_drawn_digit(published, browser, tmp_path):
    """`digitflow api`'s page at /: draw a 1 with mouse strokes, press Predict, read the answer."""
    from tests.test_api import api

    with api(published) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        try:
            page.goto(url + "/", wait_until="load", timeout=30_000)
            box = page.locator("#canvas").bounding_box()
            x = box["x"] + box["width"] / 2
            page.mouse.move(x - 12, box["y"] + 70)
            page.mouse.down()
            page.mouse.move(x, box["y"] + 45, steps=4)      # the small flag at the top
            page.mouse.move(x, box["y"] + 235, steps=20)    # the long stroke down
            page.mouse.up()
            page.click("#predict")
            page.wait_for_function("document.getElementById('digit').textContent !== ''", timeout=15_000)
            shown = page.inner_text("#digit")
            widths = page.eval_on_selector_all(".bar", "bars => bars.map(b => parseFloat(b.style.width))")
            answered_by = page.inner_text("#model")
            page.screenshot(path=str(tmp_path / "api-page.png"))
            page.click("#clear")
            cleared = page.inner_text("#digit")
        finally:
            page.close()
    assert shown == "1"
    assert len(widths) == 10 and widths[1] == max(widths) and widths[1] > 50 and sum(widths) == pytest.approx(100, abs=1)
    assert answered_by.startswith("answered by mnist-mlp v1 ")
    assert cleared == ""


def test_run_form_opens_on_plain_inputs_and_an_empty_field_keeps_the_preset(server, browser, tmp_path):
    """A deployment as `digitflow serve`/`deploy` register it: its Run form (Run → Custom run)
    opens on plain inputs, not "float | None" toggles ('Property is type "None"'); a value out of
    bounds is refused naming the bound; a field left empty is not sent (the preset's value)."""
    import nn.presets
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli_schedule import retrain_deployment
    from flows.contract import form_switches

    # A switch cannot be left empty: it opens on the default preset's value, which every preset shares.
    assert form_switches() == {"standardize": True}
    assert all(getattr(p, k) == v for p in nn.presets.PRESETS.values() for k, v in form_switches().items())

    def register():  # (in a thread of its own: Playwright's event loop would make these calls coroutines)
        deployment = retrain_deployment(name="form-check", parameters={"preset": "fast", "home": str(tmp_path / "h")})
        with temporary_settings({PREFECT_API_URL: server}):
            return deployment.apply()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deployment_id = pool.submit(register).result()
    with client_for(server) as client:  # the schema was rewritten (prefect_compat entry 7 did not fall back)
        lr = client.read_deployment(deployment_id).parameter_openapi_schema["properties"]["lr"]
    assert "anyOf" not in lr and lr["type"] == "number"
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    try:
        page.goto(f"{server.removesuffix('/api')}/deployments/deployment/{deployment_id}/run", wait_until="networkidle",
                  timeout=60_000)
        page.get_by_text("epochs (Optional)").wait_for(timeout=30_000)
        form = page.inner_text("body")
        epochs = page.locator(".schema-form-property", has_text="epochs (Optional)").locator("input")
        epochs.fill("0")
        page.get_by_role("button", name="Submit").click()
        refusal = page.get_by_text("0 is less than the minimum of 1").first
        refusal.wait_for(timeout=30_000)
        refused = refusal.inner_text()
        epochs.fill("1")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(lambda url: not url.split("?")[0].endswith("/run"), timeout=30_000)
        page.screenshot(path=str(tmp_path / "run-form.png"))
    finally:
        page.close()
    assert "Property is type" not in form and "float | None" not in form
    assert "Learning rate. In (0, 1e+06]. Preset 'default': 0.05." in form
    assert "Validation failed for field 'epochs'" in refused  # the bound named, not "not valid under any of the given schemas"
    assert page.url.split("?")[0].endswith(str(deployment_id))  # left the form: the run was created
    with client_for(server) as client:
        [run] = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert run.parameters["epochs"] == 1 and run.parameters["preset"] == "fast"
    assert run.parameters["standardize"] is True
    assert not {"lr", "hidden", "floor", "deadline", "webhook", "model_name"} & set(run.parameters)
