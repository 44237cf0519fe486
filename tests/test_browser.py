"""Browser tests: notebook 03 in a real JupyterLab driven by headless Chromium, and the HTML reports offline.

They need Debian's Chromium at /usr/bin/chromium and the playwright Python package (the test
extra); without either they are skipped with the reason. Every request goes to 127.0.0.1 or to
local files: any other request is aborted by a route handler. Screenshots are written to
tests/artifacts/ (ignored by git) and their paths printed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"

playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed; "
                                      "install the test extra: pip install -e '.[test]'")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"Chromium not found at {CHROMIUM}; "
                       "install it with apt-get install chromium chromium-driver"),
]

ALL_IMAGES_DECODED = """() => [...document.images].map(image => ({
    complete: image.complete, width: image.naturalWidth, source: image.src.slice(0, 40)}))"""


@pytest.fixture(scope="module")
def run_dir(tiny_synthetic, tmp_path_factory) -> Path:
    """A real three-epoch run of `cellnb run` on the tiny synthetic set, with its three reports and index."""
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "cellnb.cli", "run", "--data-dir", str(tiny_synthetic), "--run-dir", str(run_dir),
         "-p", "epochs", "3", "-p", "image_size", "32", "-p", "batch_size", "8"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return run_dir


@pytest.fixture
def chromium(tmp_path):
    """Return a function that opens a fresh persistent Chromium context; every context is closed at the end."""
    contexts = []
    with playwright_sync.sync_playwright() as playwright:
        def open_context(*, java_script: bool = True, allowed: str = "file:"):
            profile = tmp_path / f"profile-{len(contexts)}"
            context = playwright.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                java_script_enabled=java_script, viewport={"width": 1400, "height": 1000},
            )
            context.blocked = []

            def route(request_route):
                url = request_route.request.url
                if url.startswith(allowed) or url.startswith("data:") or url.startswith("blob:"):
                    request_route.continue_()
                else:
                    context.blocked.append(url)
                    request_route.abort()

            context.route("**/*", route)
            contexts.append(context)
            return context

        yield open_context
        for context in contexts:
            context.close()


def save_screenshot(page, name: str, **options) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **options)
    print(f"screenshot: {path}")
    return path


def assert_all_images_decoded(page, minimum: int) -> None:
    page.wait_for_load_state("load")
    images = page.evaluate(ALL_IMAGES_DECODED)
    assert len(images) >= minimum
    undecoded = [image for image in images if not image["complete"] or image["width"] == 0]
    assert undecoded == []


# --- the reports -----------------------------------------------------------------------------


def test_index_and_report_without_javascript(run_dir, chromium):
    context = chromium(java_script=False)
    page = context.new_page()

    page.goto((run_dir / "reports" / "index.html").as_uri())

    assert_all_images_decoded(page, minimum=1)
    text = page.inner_text("body")
    for label in ("final validation loss", "minimum validation loss", "final validation accuracy",
                  "best validation accuracy", "Top contributors"):
        assert label in text
    links = page.eval_on_selector_all("a", "links => links.map(link => link.getAttribute('href'))")
    assert links == ["01_train.html", "02_inspect_validation.html", "03_explain_loss.html"]
    save_screenshot(page, "index.png", full_page=True)

    page.click("text=Why the validation loss rose")
    assert page.url.endswith("03_explain_loss.html")
    assert_all_images_decoded(page, minimum=10)
    assert "Interactive widget: open the notebook in JupyterLab" in page.inner_text("body")
    page.locator("h2", has_text="Epoch by epoch").scroll_into_view_if_needed()
    save_screenshot(page, "report_03_epoch_by_epoch.png")


def test_report_copied_alone_shows_figures_offline(run_dir, chromium, tmp_path):
    alone = tmp_path / "elsewhere" / "report.html"
    alone.parent.mkdir()
    shutil.copy(run_dir / "reports" / "03_explain_loss.html", alone)
    expected = alone.read_text(encoding="utf-8").count('src="data:image/png;base64,')
    context = chromium(java_script=True)
    page = context.new_page()

    page.goto(alone.as_uri())

    assert_all_images_decoded(page, minimum=expected)
    assert expected >= 10
    assert all(not url.startswith("file:") for url in context.blocked)
    print(f"requests blocked while offline: {context.blocked}")


# --- JupyterLab ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, *, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"JupyterLab exited with code {process.returncode} before answering {url}; "
                                 f"its log:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer {url} within {timeout} s")


@pytest.fixture
def jupyterlab(run_dir, tmp_path):
    """Start JupyterLab on 127.0.0.1 with a token, in a root folder laid out like the project: notebook 03 in
    notebooks/ and the run as outputs/demo, where the notebook's default run_dir points."""
    root = tmp_path / "lab"
    (root / "outputs").mkdir(parents=True)
    shutil.copytree(run_dir, root / "outputs" / "demo")
    (root / "notebooks").mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "03_explain_loss.ipynb", root / "notebooks")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Windowing would drop cells outside the viewport from the page, so every cell is kept rendered.
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')

    port, token = free_port(), secrets.token_hex(16)
    environment = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
                       JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
                       JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    log = open(tmp_path / "jupyterlab.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None",
         "--LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT, env=environment,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(f"{base}/api/status?token={token}", process, log_path=tmp_path / "jupyterlab.log")
        yield base, token
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_notebook_03_runs_and_slider_redraws(jupyterlab, chromium):
    base, token = jupyterlab
    context = chromium(allowed=base)
    page = context.new_page()
    page.set_default_timeout(60_000)

    page.goto(f"{base}/lab/tree/notebooks/03_explain_loss.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-CodeCell")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    # The same command as Run > Run All Cells, called through the application object that
    # expose_app_in_browser puts on window.
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands.isEnabled('notebook:run-all-cells')")
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for()
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    try:
        page.wait_for_function(
            """() => { const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                       return prompts.length > 0 && prompts.every(prompt => /\\[\\d+\\]/.test(prompt.textContent)); }""",
            timeout=150_000, polling=1000,
        )
    except playwright_sync.TimeoutError:
        save_screenshot(page, "jupyterlab_03_timeout.png")
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "nodes => nodes.map(n => n.textContent)")
        errors = page.locator(".jp-OutputArea-output", has_text="Error").all_inner_texts()
        pytest.fail(f"not every cell finished within 150 s; prompts {prompts}; outputs with errors {errors}")

    assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0
    slider = page.locator(".widget-hslider").first
    slider.scroll_into_view_if_needed()
    explorer_image = page.locator(".jupyter-widgets img, img.widget-image").first
    readout = slider.locator(".widget-readout")
    assert readout.inner_text().strip() == "3"
    before = explorer_image.get_attribute("src")

    slider.locator(".noUi-handle").focus()
    page.keyboard.press("Home")

    page.wait_for_function("([element, before]) => element.src !== before",
                           arg=[explorer_image.element_handle(), before], timeout=30_000, polling=500)
    assert readout.inner_text().strip() == "1"
    assert explorer_image.evaluate("image => image.naturalWidth") > 0
    explorer_image.scroll_into_view_if_needed()
    save_screenshot(page, "jupyterlab_03_epoch_slider.png")
    assert [url for url in context.blocked if "127.0.0.1" in url] == []
