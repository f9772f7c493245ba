"""The search page in a real browser: headless Debian Chromium, driven by Playwright, against a
`blipsearch serve` process on the demo model and the demo folder.

Needs `chromium` (apt) and the `playwright` package (in `[dev]`; its own browsers are never downloaded).
Without them the test skips, unless BLIPSEARCH_BROWSER_TESTS=1 (CI sets it): then it fails. Set
BLIPSEARCH_SCREENSHOT=PATH to keep a copy of the screenshot (README shows one: retrieval/server/screenshot.png).
"""

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner import CLI, blipsearch

README_QUERY = "a large red circle left of a large blue square"
CHROMIUM = "/usr/bin/chromium"
# without the last four, Chromium floods a closed network with background requests; containers give /dev/shm
# only 64 MB, which Chromium outgrows
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEMO_MODEL = Path(__file__).parents[1] / "training" / "demo_model"


def _browser_missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing and os.environ.get("BLIPSEARCH_BROWSER_TESTS") == "1":
        pytest.fail(f"BLIPSEARCH_BROWSER_TESTS=1 but {missing}")
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo folder indexed with the demo model; the role ("own", "twin", "mirror" or None) of each file."""
    from benchmark_scripts import scenes

    root = tmp_path_factory.mktemp("browser")
    sc = scenes()
    sc.write_demo_folder(root / "demo")
    own, twin, mirror = (np.asarray(sc.render(scene, 192)).tobytes() for scene in sc.SHOWCASE)
    rendered = {own: "own", twin: "twin", mirror: "mirror"}
    roles = {str(p): rendered.get(np.asarray(Image.open(p)).tobytes()) for p in (root / "demo").glob("*.png")}
    blipsearch("index", str(root / "demo"), "--model", str(DEMO_MODEL), "-q", index=root / "index")
    return root, roles


@pytest.fixture(scope="module")
def server(demo):
    root, _ = demo
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key != "BLIPSEARCH_TOKEN"}  # a loopback server
    env["XDG_CACHE_HOME"] = str(root / "cache")
    process = subprocess.Popen([*CLI, "serve", "--index", str(root / "index"), "--port", str(port), "--device", "cpu"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url + "api/status", process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_until_up(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"blipsearch serve exited: {process.stdout.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"blipsearch serve did not answer {url} within {seconds} s")


def tile_paths(page) -> list[str]:
    return page.locator("#grid li").evaluate_all("tiles => tiles.map(t => t.dataset.path)")


def test_the_page_answers_the_readme_query_and_an_image(browser, server, demo, tmp_path):
    _, roles = demo
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(server)
    page.fill("#q", README_QUERY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#grid li")
    ranked = [roles[p] for p in tile_paths(page)]
    assert ranked[0] == "own" and ranked.index("twin") > 0, ranked
    assert "q=a+large+red+circle" in page.url  # the query lives in the URL
    page.wait_for_function("[...document.querySelectorAll('#grid img')].slice(0, 8).every(i => i.complete "
                           "&& i.naturalWidth > 0)")
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot))
    assert Image.open(shot).size == (1100, 760)
    if os.environ.get("BLIPSEARCH_SCREENSHOT"):
        Image.open(shot).convert("RGB").quantize(128).save(os.environ["BLIPSEARCH_SCREENSHOT"], optimize=True)

    # cut-off and sort act on the grid and the URL, without a new query
    page.eval_on_selector("#cutoff", "e => { e.value = 50; e.dispatchEvent(new Event('input')); }")
    kept = tile_paths(page)
    assert 0 < len(kept) < len(ranked) and "cutoff=50" in page.url
    page.select_option("#sort", "date")
    assert sorted(tile_paths(page)) == sorted(kept) and "sort=date" in page.url

    # drop the binding twin's file on the page: it comes first (an image is most like itself)
    page.select_option("#sort", "relevance")
    twin = next(p for p, role in roles.items() if role == "twin")
    _drop(page, Path(twin))
    page.wait_for_function(f"document.querySelector('#grid li')?.dataset.path === {twin!r}")
    assert page.locator("#drop img").count() == 1

    assert len(tile_paths(page)) == 60  # no match probability by image: the cut-off leaves them all

    # "similar" from the keyboard: focus a tile's button, press Enter
    second = tile_paths(page)[1]
    page.locator("#grid li").nth(1).locator("button").focus()
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#grid li')?.dataset.path === {second!r}")
    assert "similar=" in page.url
    page.close()


def _drop(page, path: Path) -> None:
    """A drop event carrying the file, as a desktop drag would deliver it."""
    page.evaluate("""([bytes, name]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
        document.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
    }""", [list(path.read_bytes()), path.name])


def test_the_page_serves_no_outside_assets():
    from importlib import resources

    page = resources.files("blipsearch.retrieval.server").joinpath("page.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "src=\"/" not in page


def test_head_answers_with_the_headers_alone(server, demo):
    """Health checks and `curl -I` got 405 from every route; a search stays GET only."""
    import urllib.error

    root, _ = demo
    photo = next((root / "demo").glob("*.png"))
    for route in ("", "api/status", f"api/thumbnail?path={photo}", f"api/original?path={photo}"):
        with urllib.request.urlopen(server + route, timeout=30) as got:
            body, kind = got.read(), got.headers["Content-Type"]
        with urllib.request.urlopen(urllib.request.Request(server + route, method="HEAD"), timeout=30) as head:
            assert (head.status, head.headers["Content-Type"], head.read()) == (200, kind, b""), route
            if head.headers["Content-Length"] is not None:  # the original streams: no length to give
                assert int(head.headers["Content-Length"]) == len(body), route
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(server + "api/search?q=red", method="HEAD"), timeout=30)
    assert refused.value.code == 405
