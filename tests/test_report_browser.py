"""The report in a real browser: headless Chromium opens a layer page from file://.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with the
standard library only. Skips only when chromium or chromedriver is not installed.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from results_fixture import make_results_dir

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).is_file()), None)
CHROMEDRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "")
                     if p and Path(p).is_file()), None)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium test needs the Debian packages chromium and chromium-driver "
           "(/usr/bin/chromium, /usr/bin/chromedriver), which are not installed here")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """Just enough of the W3C WebDriver protocol for this test."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path} failed: {e.read().decode()[:500]}") from e

    def s(self, method: str, path: str, body: Any = None) -> Any:
        return self.call(method, f"/session/{self.session}{path}", body)

    def script(self, source: str, *args: Any) -> Any:
        return self.s("POST", "/execute/sync", {"script": source, "args": list(args)})

    def click(self, css: str) -> None:
        element = self.s("POST", "/element", {"using": "css selector", "value": css})
        self.s("POST", f"/element/{element[ELEMENT]}/click", {})


@pytest.fixture()
def browser(tmp_path: Path):
    port = _free_port()
    log = open(tmp_path / "chromedriver.log", "w")
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    driver = WebDriver(port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if driver.call("GET", "/status", timeout=2).get("ready"):
                    break
            except (OSError, AssertionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("chromedriver did not become ready within 10 s")
            time.sleep(0.1)
        caps = {"browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'chrome-profile'}",
                    "--window-size=1200,900"]},
                "goog:loggingPrefs": {"browser": "ALL"}}
        created = driver.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=60)
        driver.session = created["sessionId"]
        yield driver
    finally:
        if driver.session:
            try:
                driver.call("DELETE", f"/session/{driver.session}", timeout=10)
            except (OSError, AssertionError):
                pass
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _visible_units(driver: WebDriver) -> list[int]:
    return driver.script(
        "return Array.from(document.querySelectorAll('#unit-grid .unit-card'))"
        ".filter(c => c.offsetParent !== null).map(c => parseInt(c.dataset.unit));")


def test_layer_page_in_headless_chromium(tmp_path: Path, browser: WebDriver) -> None:
    from reports.render import render_report

    results = make_results_dir(tmp_path / "run", seed=3)
    render_report(results)
    page = results / "report" / "conv2.html"
    units = json.loads((results / "conv2" / "units.json").read_text())["units"]

    browser.s("POST", "/url", {"url": page.resolve().as_uri()})
    assert browser.script("return document.readyState;") == "complete"
    # Every image (figures, thumbnails) loads from relative file:// paths; strips load lazily, so
    # make them eager and give them a moment.
    browser.script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
    deadline = time.monotonic() + 10
    while True:
        broken = browser.script("return Array.from(document.images)"
                                ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);")
        if not broken or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert broken == []
    assert browser.script("return document.images.length;") == len(units) + 1  # strips + bar chart
    assert browser.script("return document.querySelectorAll('.unit-card').length;") == len(units)

    # IoU: first click sorts descending, the second ascending (ties by unit number).
    browser.click("button.sort-button[data-key='iou']")
    by_iou = [u["unit"] for u in sorted(units, key=lambda u: (-u["iou"], u["unit"]))]
    assert _visible_units(browser) == by_iou
    browser.click("button.sort-button[data-key='iou']")
    assert _visible_units(browser) == [u["unit"] for u in sorted(units, key=lambda u: (u["iou"], u["unit"]))]
    browser.click("button.sort-button[data-key='label']")
    assert _visible_units(browser) == [u["unit"] for u in sorted(units, key=lambda u: (u["label"], u["unit"]))]

    # Filtering by category hides the others.
    browser.script("const s = document.getElementById('category-filter'); s.value = 'shape';"
                   "s.dispatchEvent(new Event('change'));")
    shape_units = [u["unit"] for u in sorted(units, key=lambda u: (u["label"], u["unit"]))
                   if u["category"] == "shape"]
    assert _visible_units(browser) == shape_units
    assert browser.script("return document.getElementById('shown-count').textContent;") == \
        f"{len(shape_units)} of {len(units)} units shown"

    shot = base64.b64decode(browser.s("GET", "/screenshot"))
    (tmp_path / "conv2.png").write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 1000

    logs = browser.s("POST", "/se/log", {"type": "browser"})
    errors = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert errors == [], errors
