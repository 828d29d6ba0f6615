"""The browser face in a real browser (Playwright driving headless Chromium): the page of a real `tuneflow serve`, and report.html opened from disk.

Screenshots go to a temporary folder, or to docs/img/ (the README's and the guides' pictures) with
TUNEFLOW_SCREENSHOTS=1, so a test run leaves the working tree as it was. Without a browser these tests
skip, except under CI (the CI variable set), where they fail: `make test` installs the system's
Chromium when it is missing (apt-get), so a CI run that cannot start one is broken, not excused.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from conftest import REPO

SHOTS = REPO / "docs" / "img" if os.environ.get("TUNEFLOW_SCREENSHOTS") == "1" else \
    Path(tempfile.mkdtemp(prefix="tuneflow-shots-"))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The system's Chromium: $TUNEFLOW_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    given = os.environ.get("TUNEFLOW_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _no_browser(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and no browser can start: {why}. `make test` installs Debian's chromium "
                    "(apt-get install chromium); set TUNEFLOW_CHROMIUM to another Chromium's path.")
    pytest.skip(f"no browser: {why} (install chromium; under CI this fails)")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        _no_browser(f"none of {', '.join(CHROMIUM_NAMES)} is on PATH")
    with sync_playwright() as p:
        try:
            # Playwright's own browser download is not used: the system's Chromium is
            b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        except Exception as exc:  # noqa: BLE001 - any launch failure means no browser
            _no_browser(f"{path} does not start ({str(exc).splitlines()[0]})")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    yield pg
    context.close()


# ---- the service's page -----------------------------------------------------------------------
MAX_BYTES = 400_000  # the server's request limit in these tests: a 700 x 700 noise PNG is over it


@pytest.fixture(scope="module")
def server(serving_run, tmp_path_factory):
    """`tuneflow serve` of the shared small run with an index of its images (thumbnails made by
    `tuneflow index`), on a free port, a small request limit; yields (base URL, run, images)."""
    run, images = serving_run
    index = tmp_path_factory.mktemp("page") / "index"
    r = subprocess.run([sys.executable, "-m", "tuneflow", "index", str(run), str(images), "--out", str(index),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((index / "thumbs").glob("*.jpg"))) == 90
    proc, url = _serve(run, "--index", str(index), "--max-request-bytes", str(MAX_BYTES))
    yield url, run, images
    proc.terminate()
    proc.wait(timeout=60)


def _serve(run, *args, env=None):
    """`tuneflow serve RUN ARGS --port 0` -> (process, base URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneflow", "serve", str(run), *args, "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    url, deadline, seen = None, time.time() + 240, []
    while url is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        url = m.group(1) if m else None
    assert url, "".join(seen)[-3000:]
    while time.time() < deadline:  # the line is printed as the socket is bound, before uvicorn listens
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return proc, url


def _shot(pg, name):
    """A full-page screenshot for the README and docs, kept small: 256 adaptive colours (a page is
    flat colours and text; a full-colour PNG of report.html is 1.3 MB, this ~1/4 of it)."""
    from PIL import Image
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / name), full_page=True)
    Image.open(SHOTS / name).convert("RGB").quantize(256).save(SHOTS / name, optimize=True)


@pytest.mark.slow
def test_page_shows_predictions_heatmaps_and_neighbours_equal_to_the_api(server, page):
    url, run, images = server
    files = [sorted((images / c).glob("*.png"))[3] for c in ("a", "b")]
    sent = []
    page.on("request", lambda req: sent.append(req.url))
    page.goto(url + "/")
    page.wait_for_selector("#card-accuracy")
    report = json.loads((run / "report.json").read_text())
    assert f"val accuracy {report['val_accuracy']:.4f} vs majority rate {report['majority_rate']:.4f}" \
        in page.inner_text("#card-accuracy")
    assert page.locator("table.confusion td").count() == 9 and page.locator("svg.chart").count() == 2
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_function("document.querySelectorAll('.result.done').length == 2", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('.neighbour img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    for f in files:
        card = page.locator(f'.result[data-name="{f.name}"]')
        with httpx.Client(base_url=url, timeout=60) as c:
            def post(path):
                return c.post(path, files={"files": (f.name, f.read_bytes(), "image/png")}).json()
            want = post("/v1/classify?top=5")["predictions"][0]
            shown = card.locator(".prob")
            assert shown.count() == len(want["top"])
            for i, (name, p) in enumerate(want["top"]):
                assert shown.nth(i).get_attribute("data-class") == name
                assert float(shown.nth(i).get_attribute("data-probability")) == p  # the API's number, unrounded
                assert shown.nth(i).inner_text() == f"{p:.4f}"
            e = post(f"/v1/explain?class={want['class']}")["explanations"][0]
            assert card.locator("img.heatmap").get_attribute("src") == "data:image/png;base64," + e["overlay_png"]
            hits = post("/v1/search?k=6")["results"][0]
            tiles = card.locator(".neighbour")
            assert tiles.count() == 6
            for i, h in enumerate(hits):
                assert int(tiles.nth(i).get_attribute("data-id")) == h["id"]
                assert float(tiles.nth(i).get_attribute("data-score")) == h["score"]
                assert tiles.nth(i).locator(".folder").inner_text() == Path(h["path"]).parent.name
    # the page used the public API only, on this server, and fetched thumbnails by item id
    assert all(u.startswith(url) or u.startswith(("data:", "blob:")) for u in sent)
    assert any(re.search(r"/v1/index/items/\d+/thumbnail$", u) for u in sent)
    _shot(page, "browser_page.png")


def test_page_shows_an_oversized_upload_as_the_413_message(server, page, tmp_path):
    url, _, _ = server
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MAX_BYTES
    page.goto(url + "/")
    page.wait_for_selector("#card-accuracy")
    page.set_input_files("#files", str(big))
    page.wait_for_selector(".result.failed", timeout=60_000)
    message = page.inner_text("#error")
    assert "Too large for the service (HTTP 413, request_too_large)" in message
    assert f"max_request_bytes = {MAX_BYTES} bytes" in message
    _shot(page, "browser_413.png")


def test_page_shows_415_and_503_as_readable_messages(server, page, tmp_path):
    url, _, _ = server
    tiff = tmp_path / "scan.tiff"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tiff)
    page.goto(url + "/")
    page.wait_for_selector("#card-accuracy")
    page.set_input_files("#files", str(tiff))  # the server's own 415
    page.wait_for_selector(".result.failed", timeout=60_000)
    assert "Unsupported image type (HTTP 415, unsupported_image_type): image 0 is TIFF" in page.inner_text("#error")
    # a 503 as the service gives it when shutting down (not provoked here: answered by the browser)
    page.route("**/v1/classify*", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=json.dumps({"error": "the server is shutting down; retry on another replica.", "code": "shutting_down"})))
    page.set_input_files("#files", _small_png(tmp_path))
    page.wait_for_function("document.querySelectorAll('.result.failed').length == 2", timeout=60_000)
    assert page.inner_text("#error") == (
        "The service is unavailable right now (starting, shutting down or out of memory): try again shortly "
        "(HTTP 503, shutting_down): the server is shutting down; retry on another replica.")


def _small_png(folder):
    p = folder / "small.png"
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(p)
    return str(p)


def test_page_takes_dropped_and_pasted_images(server, page, tmp_path):
    url, _, images = server
    data = base64.b64encode(sorted((images / "b").glob("*.png"))[0].read_bytes()).decode()
    page.goto(url + "/")
    page.wait_for_selector("#card-accuracy")
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = () => { const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.png", {type: "image/png"})); return dt; };
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer(), bubbles: true}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer(), bubbles: true}));
    }""", data)
    page.wait_for_function("document.querySelectorAll('.result.done').length == 2", timeout=120_000)
    assert page.locator(".result.done .top li:first-child .name").all_inner_texts() == ["b", "b"]


def test_page_sends_the_api_key_the_user_typed(server, page):
    url, _, _ = server
    auth = {}
    page.on("request", lambda req: auth.__setitem__(req.url, req.headers.get("authorization")))
    page.goto(url + "/")
    page.wait_for_selector("#card-accuracy")
    assert auth[url + "/v1/info"] is None  # no key typed: no header
    page.fill("#api-key", "s3cret-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("sessionStorage.getItem('tuneflow-api-key') === 's3cret-key'")
    page.wait_for_timeout(300)
    assert auth[url + "/v1/info"] == "Bearer s3cret-key"
    page.reload()  # kept for the session's page loads
    page.wait_for_selector("#card-accuracy")
    assert page.input_value("#api-key") == "s3cret-key"


def test_page_asks_for_the_key_a_keyed_service_needs_and_then_works(serving_run, page):
    run, images = serving_run
    proc, url = _serve(run, env={**os.environ, "TUNEFLOW_API_KEY": "k3y-for-the-page"})
    try:
        page.goto(url + "/")  # the page itself is open
        page.wait_for_function("!document.getElementById('error').hidden")
        assert "The service needs an API key: type it in the field at the top right (HTTP 401" \
            in page.inner_text("#error")
        page.fill("#api-key", "k3y-for-the-page")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#card-accuracy")
        page.set_input_files("#files", str(sorted((images / "c").glob("*.png"))[0]))
        page.wait_for_selector(".result.done", timeout=120_000)
        assert page.locator(".result.done .top li:first-child .name").inner_text() == "c"
        assert page.locator(".result.done img.heatmap").get_attribute("src").startswith("data:image/png;base64,")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_page_is_served_from_the_package_and_nothing_else(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        home = c.get("/")
        assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
        assert not re.search(r"(src|href)=\"https?://", home.text)  # no CDN: works offline
        assert c.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        for bad in ("/static/page.py", "/static/..%2F__init__.py", "/static/%2Fetc%2Fpasswd"):
            assert c.get(bad).status_code == 404
        r = c.get("/v1/index/items/100000/thumbnail")
        assert r.status_code == 404 and r.json()["code"] == "no_such_item"
        assert c.get("/v1/index/items/-1/thumbnail").status_code == 422
        t = c.get("/v1/index/items/0/thumbnail")
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg" and len(t.content) < 10_000


# ---- report.html from disk ----------------------------------------------------------------------
def test_report_html_opened_from_disk_is_complete_and_self_contained(serving_run, page):
    run, _ = serving_run
    html = run / "report.html"
    assert html.is_file()  # written by the run itself
    report = json.loads((run / "report.json").read_text())
    sent = []
    page.on("request", lambda req: sent.append(req.url))
    page.goto(html.resolve().as_uri())
    page.wait_for_load_state("load")
    text = page.inner_text("body")
    assert f"Verdict: {report['verdict']}" in text
    assert f"{report['val_accuracy']:.4f}" in text and f"{report['majority_rate']:.4f}" in text
    for title in ("Per class (validation)", "Confusion matrix", "Curves", "Top losses", "Stages",
                  "Recipe and command"):
        assert page.locator("h2", has_text=title).count() == 1, title
    assert f"tuneflow finetune {run / 'recipe.json'} --data" in text
    imgs = page.locator("img")
    assert imgs.count() == 3  # confusion, curves, top losses: all inlined and decoded
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0 && "
                         "i.src.startsWith('data:image/png;base64,'))")
    assert all(u.startswith(("file:", "data:")) for u in sent), sent  # no network
    _shot(page, "report_html.png")


def test_report_cli_rewrites_it_and_open_is_quiet_without_a_browser(serving_run, tmp_path):
    run, _ = serving_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model", "checkpoints", "*.h5", "model.keras"))
    (copy / "report.html").unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    r = subprocess.run([sys.executable, "-m", "tuneflow", "report", str(copy), "--open"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (copy / "report.html").is_file() and r.stdout.strip() == str(copy / "report.html")
    assert "no browser to open here" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tuneflow", "report", str(tmp_path / "nothing")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "is not a folder" in r.stderr
    data = base64.b64encode((copy / "curves.png").read_bytes()).decode()
    assert data in (copy / "report.html").read_text()


def test_no_browser_fails_under_ci_and_skips_elsewhere(tmp_path):
    """The rule the fixture enforces, run on a test that needs a browser, with none to be found."""
    (tmp_path / "test_needs_browser.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_browser import browser  # noqa: F401 - the fixture\n\n"
        "def test_needs_it(browser):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["TUNEFLOW_CHROMIUM"] = str(tmp_path / "no-such-chromium")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-rs",
            str(tmp_path / "test_needs_browser.py"), "--rootdir", str(tmp_path)]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:]
    r = subprocess.run(args, capture_output=True, text=True, env={**env, "CI": "1"}, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and "CI is set and no browser can start" in r.stdout, r.stdout[-2000:]
