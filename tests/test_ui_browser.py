"""The web UI in a real browser: headless Debian Chromium driven by Playwright opens the app, picks a technique and
its option, runs a generation on the tiny FLUX model, checks the image against stock diffusers, downloads it with
its parameters, and saves screenshots.

CI installs Chromium (`.ci/run`: `apt-get install chromium`) and Playwright (the `test` extra); there, a missing
browser fails this test. Elsewhere it is skipped with the reason. Screenshots go to ``$ATTNPACK_UI_SCREENSHOTS`` (keep
them as CI artefacts) or the test's temporary folder; the docs' pictures come from ``docs/make_ui_screenshots.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from test_ui_support import (
    CHROMIUM_ARGS,
    STEPS,
    Watch,
    chromium_path,
    launched,
    need,
    pixels,
    reference_image,
    ui_techniques,
)

from attnpack import read_parameters


need("gradio", "pip install attnpack[ui]")
playwright = need("playwright.sync_api", "pip install attnpack[test]")

from attnpack.ui import build_demo  # noqa: E402
from attnpack.ui._runtime import default_loader  # noqa: E402


PROMPT = "a red circle left of a blue square"


def test_generate_in_a_real_browser(tmp_path):
    executable = chromium_path()
    shots = Path(os.environ.get("ATTNPACK_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    expect = playwright.expect
    demo = build_demo(Watch(default_loader(device="cpu")), device="cpu", techniques=ui_techniques())
    with launched(demo) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.get_by_label("Prompt").fill(PROMPT)
            page.get_by_label("Attention technique").click()
            page.get_by_role("option", name="temperature", exact=True).click()
            page.get_by_label("factor", exact=True).fill("3")
            page.get_by_text("Advanced settings").click()
            page.get_by_label("Steps", exact=True).fill(str(STEPS))
            page.get_by_label("Seed", exact=True).fill("7")
            page.get_by_label("Randomize seed").uncheck()
            page.get_by_role("button", name="Run", exact=True).click()

            result = page.locator('img[src*="gradio_api/file="]')
            expect(result).to_be_visible(timeout=120_000)
            expect(page.get_by_label("Seed", exact=True)).to_have_value("7")
            page.screenshot(path=str(shots / "ui_generate.png"), full_page=True)

            # what the download button gives: the PNG with the generation parameters inside
            href = page.get_by_test_id("download-link").get_attribute("href")
            download = tmp_path / "download.png"
            download.write_bytes(page.request.get(href).body())
            params = read_parameters(download)
            assert params["seed"] == 7 and params["steps"] == STEPS and params["prompt"] == PROMPT
            assert params["techniques"] == [{"name": "temperature", "factor": 3.0}]
            np.testing.assert_array_equal(
                pixels(download), reference_image("tiny-flux", PROMPT, 7, technique="temperature", factor=3.0)
            )

            page.get_by_role("tab", name="Benchmarks / Info").click()
            page.get_by_role("button", name="Check this machine", exact=True).click()
            expect(page.get_by_text("attention backend", exact=True)).to_be_visible(timeout=120_000)
            page.screenshot(path=str(shots / "ui_info.png"), full_page=True)
        finally:
            browser.close()
    for name in ("ui_generate.png", "ui_info.png"):
        with Image.open(shots / name) as im:
            assert im.format == "PNG" and im.width == 1200 and im.height > 600
