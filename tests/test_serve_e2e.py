"""``d3s2 serve`` end to end in a real browser: the server runs as a subprocess on loopback, Debian's Chromium (through
Playwright, headless) uploads an image, generates, waits for the 3D viewer to draw, downloads the mesh and checks it
with trimesh; bad uploads must give a message in the page. Every request to anything but the local server is blocked
and recorded: the page must work offline.

The model: the bundled demo model when the package has one, else a tiny random-weight pipeline (test_serve.py).
Skipped (with the reason) when Playwright, Gradio or a Chromium binary is missing; CI installs Chromium (.ci/run).

``D3S2_SERVE_SCREENSHOT=docs/serve.png pytest tests/test_serve_e2e.py`` also keeps the finished page's screenshot.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("gradio") is None:  # the server subprocess imports it; this process need not
    pytest.skip("gradio is not installed (pip install 'd3s2[serve]')", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
if CHROMIUM is None:
    pytest.skip("no Chromium binary (Debian: apt-get install chromium)", allow_module_level=True)

from pipeline_helpers import make_tiny_weights, square_image  # noqa: E402

from d3s2.serve.backend import bundled_weights  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_e2e")
    bundled = bundled_weights()
    weights = None if bundled is not None else make_tiny_weights(root)
    port = _free_port()
    out = root / "sessions"
    cmd = [sys.executable, "-m", "d3s2.cli", "serve", "--port", str(port), "--output-dir", str(out),
           "--max-file-size", "1", "--device", "cpu"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    log = open(root / "server.log", "w+")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"d3s2 serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail("d3s2 serve did not start listening within 120 s")
            time.sleep(0.5)
    yield {"url": url, "out": out, "weights": weights or bundled, "root": root, "bundled": bundled is not None,
           "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser, server, external):
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()

    def route(r):
        if r.request.url.startswith(server["url"]) or r.request.url.startswith("data:") \
                or r.request.url.startswith("blob:"):
            r.continue_()
        else:  # the page must not need the internet (fonts, analytics, CDNs)
            external.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(server["url"])
    page.wait_for_selector("#d3s2-generate", timeout=60_000)
    return ctx, page


def _upload(page, path):
    if page.query_selector("#d3s2-upload input[type=file]") is None:  # a file is shown: clear it first
        page.click("#d3s2-upload button[aria-label='Clear']")
        page.wait_for_selector("#d3s2-upload input[type=file]", state="attached", timeout=10_000)
    page.set_input_files("#d3s2-upload input[type=file]", str(path))


def _assert_no_server_paths(page, server):
    html = page.content()
    for secret in (str(server["root"]), str(server["out"]), str(server["weights"]), str(Path.home()) + "/",
                   "Traceback", "site-packages"):
        assert secret not in page.inner_text("body"), secret
    for secret in (str(server["root"]), str(server["weights"]), "Traceback"):
        assert secret not in html, secret


def _viewer_drawn(page, timeout=30.0) -> np.ndarray:
    """Wait until the 3D viewer's screenshot shows something besides its flat background."""
    from io import BytesIO

    from PIL import Image

    deadline = time.time() + timeout
    while True:
        shot = np.asarray(Image.open(BytesIO(page.locator("#d3s2-viewer canvas").screenshot())).convert("L"))
        if shot.std() > 5.0 or time.time() > deadline:
            return shot
        time.sleep(0.5)


def _upload_image(server, path: Path) -> Path:
    """The image a user uploads: with the bundled demo model a render of a held-out mesh (a copy of a bundled example
    under another name: the demo model knows shaded objects, not flat colour patches), else a flat rectangle."""
    if server["bundled"]:
        from d3s2.pipelines.bundled import example_images

        shutil.copy(example_images()[0], path)
        return path
    return square_image(path, size=128)


def _settings(page, server, faces):
    page.fill("#d3s2-faces input", str(faces))
    # keep the CPU runs short: few sampling steps (the demo model still gives a shape; the tiny one always does)
    for key, steps in ((("dense", 6), ("512", 6)) if server["bundled"] else (("512", 1),)):
        page.fill(f"#d3s2-steps-{key} input[type=number]", str(steps))
        page.press(f"#d3s2-steps-{key} input[type=number]", "Enter")


@pytest.mark.slow
def test_upload_generate_view_and_download(server, browser, tmp_path):
    import trimesh

    external: list[str] = []
    t0 = time.time()
    ctx, page = _page(browser, server, external)
    examples = page.query_selector_all(".gallery button, button.gallery-item")
    if examples:  # picking a bundled example shows its crop and mask
        examples[0].click()
        page.wait_for_selector("#d3s2-preview img", timeout=20_000)
        assert "Image ready" in page.inner_text("#d3s2-status")
    image = _upload_image(server, tmp_path / "my shape.png")
    _upload(page, image)
    page.wait_for_selector("#d3s2-status:has-text('Image ready (my shape.png)')", timeout=20_000)
    assert page.query_selector("#d3s2-preview img") is not None
    # record every progress text the page shows while the job runs
    page.evaluate("""() => { window.__progress = new Set();
        new MutationObserver(() => document.querySelectorAll('.progress-text, .progress-level-inner, .meta-text')
            .forEach(e => window.__progress.add(e.innerText))).observe(document.body,
            {subtree: true, childList: true, characterData: true}); }""")
    _settings(page, server, faces=2000)
    page.click("#d3s2-format label:has-text('obj')")
    page.click("#d3s2-generate")
    page.wait_for_selector("#d3s2-status .d3s2-ok:has-text('Done'), #d3s2-status .d3s2-error", timeout=120_000)
    status = page.inner_text("#d3s2-status")
    assert status.startswith("Done"), status
    assert "faces" in status and "sparse 512" in status
    progress = " ".join(page.evaluate("() => Array.from(window.__progress)"))
    assert "sparse 512" in progress, progress  # per-stage progress was shown while it ran
    page.wait_for_selector("#d3s2-viewer canvas", timeout=30_000)
    shot = _viewer_drawn(page)
    assert shot.std() > 5.0, "the 3D viewer stayed blank"
    with page.expect_download(timeout=30_000) as dl:
        page.click("#d3s2-download")
    download = dl.value
    assert download.suggested_filename == "my_shape.obj"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    mesh = trimesh.load(saved, force="mesh")
    assert 0 < len(mesh.faces) <= 2100
    assert np.isfinite(np.asarray(mesh.vertices)).all()
    # this session's own folder holds this run's files
    sessions = [p for p in server["out"].iterdir() if p.is_dir()]
    assert len(sessions) == 1
    files = sorted(p.name for p in sessions[0].glob("run-*/*"))
    assert files == ["my_shape.glb", "my_shape.obj"]
    _assert_no_server_paths(page, server)
    assert external == []
    seconds = time.time() - t0
    target = os.environ.get("D3S2_SERVE_SCREENSHOT")
    if target:
        page.screenshot(path=target, full_page=True)
    ctx.close()
    # closing the page ends the session: its folder goes
    deadline = time.time() + 30
    while sessions[0].exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not sessions[0].exists(), "the closed session's folder was not removed"
    print(f"browser run {seconds:.1f} s")


def test_bad_uploads_show_a_message(server, browser, tmp_path):
    external: list[str] = []
    ctx, page = _page(browser, server, external)
    fake = tmp_path / "notes.png"
    fake.write_text("a text file renamed .png")
    _upload(page, fake)
    page.wait_for_selector("#d3s2-status .d3s2-error", timeout=20_000)
    status = page.inner_text("#d3s2-status")
    assert "Cannot use this image" in status and "notes.png" in status and "not an image" in status
    page.click("#d3s2-generate")  # generating anyway gives the same message, and no result
    page.wait_for_timeout(1500)
    assert "not an image" in page.inner_text("#d3s2-status")
    assert page.query_selector("#d3s2-viewer canvas") is None
    assert not page.locator("#d3s2-download").is_visible()

    text = tmp_path / "notes.txt"
    text.write_text("plain text")
    _upload(page, text)
    toast = page.wait_for_selector("text=Invalid file type", timeout=20_000)
    assert "notes.txt" in toast.inner_text()

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(int(1.5 * 2**20)))  # above the --max-file-size 1 (MB) of this server
    _upload(page, big)
    page.wait_for_selector("text=exceed the maximum allowed size", timeout=20_000)
    _assert_no_server_paths(page, server)
    assert external == []
    ctx.close()


@pytest.mark.slow
def test_two_sessions_queue_and_keep_their_own_outputs(server, browser, tmp_path):
    external: list[str] = []
    pages = []
    for name in ("alice", "bob"):
        ctx, page = _page(browser, server, external)
        _upload(page, _upload_image(server, tmp_path / f"{name}.png"))
        page.wait_for_selector(f"#d3s2-status:has-text('Image ready ({name}.png)')", timeout=20_000)
        _settings(page, server, faces=1000)
        pages.append((name, ctx, page))
    pages[1][2].check("#d3s2-randomise input")  # bob asks for a random seed
    for _, _, page in pages:  # both press Generate at once: the second waits in the queue
        page.click("#d3s2-generate")
    for name, _, page in pages:
        page.wait_for_selector("#d3s2-status .d3s2-ok:has-text('Done'), #d3s2-status .d3s2-error", timeout=120_000)
        assert page.inner_text("#d3s2-status").startswith("Done"), page.inner_text("#d3s2-status")
        assert page.inner_text("#d3s2-download") == f"Download {name}.glb"
        seed = page.input_value("#d3s2-seed input")
        assert f"seed {seed}." in page.inner_text("#d3s2-status")  # the seed used is shown and kept in the field
        assert (seed == "0") == (name == "alice")
    runs = sorted(p.name for p in server["out"].glob("*/run-*/*.glb"))
    assert runs == ["alice.glb", "bob.glb"]
    assert len({p.parent.parent for p in server["out"].glob("*/run-*/*.glb")}) == 2  # one folder per session
    assert external == []
    for _, ctx, _ in pages:
        ctx.close()
