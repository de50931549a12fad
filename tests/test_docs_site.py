"""The documentation site builds strictly and works in a real browser, offline.

The site is built with the README's command (``mkdocs build --strict``, into ``build/site/``);
run last in the session (``tests/conftest.py``), the build renders the notebooks that
``tests/test_notebooks.py`` just executed instead of executing them again. The built site is
served on 127.0.0.1 and opened in headless Chromium driven by selenium, with every flag that
keeps Chromium off the network. From the landing page the test follows the navigation to every
page (each notebook page is reached through a nav link), and on each page checks that every
image has loaded (``naturalWidth > 0``; on a notebook page as many as the executed notebook has
image outputs), that MathJax reported no error, and that the browser console is empty: a
failed request, a script error or a warning fails the test.

``NPMNV3_SITE_DIR=DIR`` tests an already built site instead of building one. Without mkdocs,
selenium or Chromium the test skips, except with ``CI=true``, where it fails (``.ci/run``
installs Debian's ``chromium`` and ``chromium-driver``; the Python packages come with
``pip install -e '.[test]'``).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

import executed_notebooks as nbx
import pytest

ROOT = nbx.ROOT
SITE = ROOT / "build" / "site"                # mkdocs.yml's site_dir
BUILD_TIMEOUT = 1800        # seconds: on a fresh checkout the build executes every notebook
PAGE_TIMEOUT = 60           # seconds for a page, its images and MathJax
# The flags that keep Chromium off the network and independent of any profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  # every host but this one fails to resolve, so a page that needs the network
                  # fails here even on a machine that has one
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                  "--window-size=1280,900")
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _missing(what: str):
    msg = f"{what} (pip install -e '.[test]'; apt-get install chromium chromium-driver)"
    if _in_ci():
        pytest.fail(msg + "; it is required when CI=true", pytrace=False)
    pytest.skip(msg)


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"{module} is needed to build and check the documentation site")


def _browser_binaries() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        _missing("Chromium and its chromedriver are needed to check the documentation site")
    return browser, driver


@pytest.fixture(scope="session")
def site() -> Path:
    """The built site: ``NPMNV3_SITE_DIR``, else built now with the README's command."""
    given = os.environ.get("NPMNV3_SITE_DIR")
    if given:
        path = Path(given)
        assert (path / "index.html").is_file(), f"NPMNV3_SITE_DIR={given} has no index.html"
        return path
    for module in ("mkdocs", "material", "mkdocs_jupyter", "mkdocstrings_handlers.python",
                   "mathjax", "nbclient"):
        _require(module)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=ROOT,
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    took = time.perf_counter() - start
    if run.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed after {took:.0f} s:\n{run.stderr[-6000:]}",
                    pytrace=False)
    print(f"\nmkdocs build --strict: {took:.1f} s")
    executing = [ln for ln in run.stderr.splitlines() if "executing notebooks/" in ln]
    if executing:
        print("the build executed:\n" + "\n".join(executing))
    return SITE


@pytest.fixture(scope="session")
def server(site):
    """``site`` served over HTTP on 127.0.0.1 (a free port), for the session."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    binary, driver_path = _browser_binaries()
    _require("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver is given: selenium's own driver manager (which may go online) is not used.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    driver.set_script_timeout(PAGE_TIMEOUT)
    yield driver
    driver.quit()


def _nav_links(driver, base: str) -> list[str]:
    """Absolute URLs of the pages linked from the page's navigation (this site only)."""
    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link[href]'))"
        ".map(a => a.href)")
    out = []
    for href in hrefs:
        url = href.split("#")[0]
        if url.startswith(base) and url not in out:
            out.append(url)
    return out


def _page_state(driver) -> dict:
    """After the page, its images and MathJax have settled: what the checks need."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const images = () => Array.from(document.images);
        const settled = () => images().every(i => i.complete);
        const finish = () => done({
            images: images().map(i => ({src: i.currentSrc.slice(0, 80), width: i.naturalWidth,
                                        notebook: !!i.closest('.jupyter-wrapper')})),
            mathErrors: document.querySelectorAll('mjx-merror').length,
            notebook: !!document.querySelector('.jupyter-wrapper'),
            title: document.title,
        });
        const math = (window.MathJax && MathJax.startup && MathJax.startup.promise)
            || Promise.resolve();
        math.then(() => new Promise(resolve => {
            const poll = () => settled() ? resolve() : setTimeout(poll, 50);
            poll();
        })).then(finish, error => done({scriptError: String(error)}));
    """)


def _image_outputs(path: Path) -> int:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return sum(any(m in out.get("data", {}) for m in IMAGE_MIMES)
               for cell in nb["cells"] if cell["cell_type"] == "code"
               for out in cell.get("outputs", []))


def test_site_pages_load_offline_in_chromium(site, server, browser):
    notebooks = {f"{server}notebooks/{p.stem}/": p for p in nbx.sources()}
    assert notebooks, "no notebooks/*.ipynb: nothing to check"
    browser.get(server)
    pages = _nav_links(browser, server)
    missing = [url for url in notebooks if url not in pages]
    assert not missing, f"notebook pages not linked from the site's navigation: {missing}"
    assert browser.get_log("browser") == [], "console messages on the landing page"

    problems, visited = [], []
    queue = [server] + [url for url in pages if url != server]
    while queue:
        url = queue.pop(0)
        if url != server and url not in _nav_links(browser, server):
            problems.append(f"{urlparse(url).path}: not in the navigation of "
                            f"{urlparse(browser.current_url).path}")
        browser.get(url)                  # the nav link's target, from the page we are on
        state = _page_state(browser)
        name = urlparse(url).path
        visited.append(name)
        if "scriptError" in state:
            problems.append(f"{name}: {state['scriptError']}")
            continue
        problems += [f"{name}: image {im['src']} did not load" for im in state["images"]
                     if im["width"] == 0]
        if state["mathErrors"]:
            problems.append(f"{name}: {state['mathErrors']} MathJax error(s)")
        problems += [f"{name}: console {e['level']}: {e['message']}"
                     for e in browser.get_log("browser")]
        if url in notebooks:
            executed = nbx.executed_path(notebooks[url])
            got = sum(1 for im in state["images"] if im["notebook"] and im["width"] > 0)
            if not state["notebook"]:
                problems.append(f"{name}: no rendered notebook on the page")
            elif not executed.is_file():
                problems.append(f"{name}: no executed copy {executed} to count its figures")
            elif got != _image_outputs(executed):
                problems.append(f"{name}: {got} figures shown, the executed notebook has "
                                f"{_image_outputs(executed)}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    assert set(notebooks) <= {urljoin(server, v) for v in visited}
