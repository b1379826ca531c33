"""How the web app handles an 8192x5464 picture in headless chromium (Debian's chromium).

Prints: time to open the picture (upload + the server's decode + the browser's decode and
preview), the time one frame takes to draw fitted and at 100%, the time a 40-event brush
stroke takes, and the time from the end of the stroke until the page shows the new plan
(packing the 8192x5464 mask, sending it, planning).

    .venv/bin/python benchmarks/web_open.py [--size 8192x5464]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_web_browser import chromium_path, free_port  # noqa: E402


def smooth_picture(width, height, path):
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    pixels = np.stack(np.broadcast_arrays(x * 220 + 20, y * 200 + 30, (x + y) * 100 + 20), -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)


def wait_for(url, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if b'"model_state":"ready"' in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server did not start: {url}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="8192x5464")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        picture = Path(tmp) / "big.png"
        smooth_picture(width, height, picture)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "patch_adapter.cli", "serve", "--port", str(port)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/api/config")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_selector("body[data-ready]")
                page.set_input_files("#open-file", str(picture))
                page.wait_for_function("window.openMs !== undefined", timeout=120_000)
                print(f"picture {width}x{height}, {picture.stat().st_size / 1e6:.1f} MB PNG")
                print(
                    f"open (upload, server decode, browser decode + preview): {page.evaluate('window.openMs'):.0f} ms"
                )
                frame = "() => { const t = performance.now(); render(); return performance.now() - t; }"
                fitted = [page.evaluate(frame) for _ in range(5)]
                print(f"one frame, fitted: {np.median(fitted):.1f} ms (median of 5)")
                box = page.locator("#view").bounding_box()
                cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(cx, cy)
                started = time.perf_counter()
                page.mouse.down()
                for i in range(40):
                    page.mouse.move(cx - 200 + i * 10, cy - 100 + i * 5)
                page.mouse.up()
                stroke = time.perf_counter() - started
                page.wait_for_function("Number(document.querySelector('#plan-text').dataset.evaluations) > 0")
                planned = time.perf_counter() - started - stroke
                print(f"a 40-event stroke: {stroke * 1000:.0f} ms ({stroke * 1000 / 40:.1f} ms an event)")
                print(f"stroke end -> mask packed, sent, planned, shown: {planned * 1000:.0f} ms")
                page.keyboard.press("1")
                at100 = [page.evaluate(frame) for _ in range(5)]
                print(f"one frame, 100%: {np.median(at100):.1f} ms (median of 5)")
                browser.close()
        finally:
            server.terminate()
            server.wait(20)


if __name__ == "__main__":
    main()
