"""End to end: `python -m demos.fusion_app` on 127.0.0.1, driven by Playwright in Debian's headless Chromium.

Refuses a path outside the concepts folder and an upload that is not an adapter, adds two concepts,
generates, checks that the images and the interference table appear, and saves a screenshot (the README's
``demos/screenshot.png`` when ``SV_UPDATE_SCREENSHOT=1``).
Every request outside 127.0.0.1 is blocked. Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and
the ``playwright`` pip package (no browser download: the system Chromium is used).
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_demo import make_concept

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the README's screenshot is refreshed only on request (SV_UPDATE_SCREENSHOT=1); otherwise it goes to a temp file
SCREENSHOT = REPO / "demos" / "screenshot.png"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def status_has(page, text: str, timeout: float = 60_000) -> None:
    try:
        page.wait_for_function("t => document.querySelector('#status textarea')?.value.includes(t)", arg=text,
                               timeout=timeout)
    except Exception as e:  # noqa: BLE001 (say what the status box shows instead)
        shown = page.locator("#status textarea").input_value() if page.locator("#status textarea").count() else None
        raise AssertionError(f"status never contained {text!r}; it shows {shown!r}") from e


def save_small_png(png: bytes, path: Path, limit: int = 300_000) -> None:
    """Write the screenshot, palette-quantised when the plain PNG is over ``limit`` bytes."""
    import io

    from PIL import Image

    if len(png) > limit:
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128).save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    path.write_bytes(png)


def test_fusion_app_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from spectral_vision.integrations.diffusers import load_pipeline, resolve_pretrained

    resolve_pretrained("builtin:tiny-sd")  # build the cached base once, before the app starts
    port, concepts, log = free_port(), tmp_path / "concepts", tmp_path / "app.log"
    concepts.mkdir()
    cmd = [sys.executable, "-m", "demos.fusion_app", "--model", "builtin:tiny-sd", "--concepts_dir",
           str(concepts), "--upload_dir", str(tmp_path / "up"), "--port", str(port), "--record_timesteps", "999"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    try:
        pipe = load_pipeline("builtin:tiny-sd")  # concepts made while the app starts
        make_concept(pipe, concepts / "cat", 0, seed=1, prompt="a photo of sks cat")
        make_concept(pipe, concepts / "dog", 1, seed=2, prompt="a photo of zwx dog")
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, proc, log)
        blocked = []

        def only_loopback(route):
            u = route.request.url
            if u.startswith(("http://127.0.0.1", "data:", "blob:")):
                route.continue_()
            else:
                blocked.append(u)
                route.abort()

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.route("**/*", only_loopback)
                page.goto(url)
                status_has(page, "ready", 120_000)
                folder = page.locator("#concept-folder input")
                folder.fill("/etc")  # a custom value outside --concepts_dir: refused, the app keeps running
                folder.press("Enter")
                page.click("#add-concept")
                status_has(page, "outside the allowed adapter folders")
                bogus = [tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"]
                for f in bogus:
                    f.write_text("not an adapter")
                page.get_by_text("…or upload a concept").click()  # the accordion
                page.locator("#upload input[type=file]").set_input_files([str(f) for f in bogus])
                page.click("#add-upload")
                status_has(page, "not a valid spectral_vision adapter config")
                page.get_by_text("…or upload a concept").click()  # fold it again
                for name in ("cat", "dog"):
                    folder.click()
                    page.get_by_role("option", name=str(concepts / name), exact=True).click()
                    page.click("#add-concept")
                    status_has(page, f"added {name}")
                assert page.locator("#concepts").inner_text().count("spectral_r") == 2
                page.fill("#prompt textarea", "a photo of sks cat")
                steps = page.locator("#steps input[type=number]")
                steps.fill("2")
                steps.press("Enter")
                page.click("#generate")
                status_has(page, "generated 4 images", 120_000)
                imgs = page.locator("#gallery img")
                imgs.first.wait_for()
                assert imgs.count() == 4
                page.wait_for_function("() => [...document.querySelectorAll('#gallery img')]"
                                       ".every(i => i.complete && i.naturalWidth >= 192)")
                assert "OVERALL" in page.content()
                page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")
                page.wait_for_timeout(800)
                target = SCREENSHOT if os.environ.get("SV_UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
                save_small_png(page.screenshot(full_page=True), target)
                assert target.stat().st_size > 10_000
            finally:
                browser.close()
        print(f"blocked non-loopback requests: {blocked}")
        assert "restart with --share" in log.read_text() and "share=True" not in log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert 0 < SCREENSHOT.stat().st_size < 300_000
