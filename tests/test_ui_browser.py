"""The web UI in a real browser: headless Debian Chromium driven by Playwright opens the app, picks a technique and
its option, runs a generation on the tiny FLUX model, checks the image against stock diffusers, downloads it with
its parameters, and saves screenshots; on the A-STAR tab it picks the concepts from the prompt's tokens and runs
A-STAR on the tiny SD 1.5 model; as a newcomer, it clicks every tab's first example and every technique of the Generate
tab with its defaults on the default model.

CI installs Chromium (`.ci/run`: `apt-get install chromium`) and Playwright (the `test` extra); there, a missing
browser fails this test. Elsewhere it is skipped with the reason. Screenshots go to ``$ATTNPACK_UI_SCREENSHOTS`` (keep
them as CI artefacts) or the test's temporary folder; the docs' pictures come from ``docs/make_ui_screenshots.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def app_page(tmp_path):
    """The UI (every technique, tiny models, CPU) opened in headless Chromium: yields ``(page, screenshot folder)``."""
    executable = chromium_path()
    shots = Path(os.environ.get("ATTNPACK_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    demo = build_demo(Watch(default_loader(device="cpu")), device="cpu", techniques=ui_techniques())
    with launched(demo) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url, wait_until="networkidle")
            yield page, shots
        finally:
            browser.close()


def check_screenshots(shots: Path, *names: str) -> None:
    for name in names:
        with Image.open(shots / name) as im:
            assert im.format == "PNG" and im.width == 1200 and im.height > 600


def open_advanced(page) -> None:
    """Open the visible "Advanced settings" accordion and wait until its fields are there."""
    page.get_by_text("Advanced settings").filter(visible=True).click()
    playwright.expect(page.get_by_label("Steps", exact=True).filter(visible=True)).to_be_visible()


def test_generate_in_a_real_browser(tmp_path):
    expect = playwright.expect
    with app_page(tmp_path) as (page, shots):
        # open the accordion first: a field filled while it is still mounting can lose its value
        open_advanced(page)
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Attention technique").click()
        page.get_by_role("option", name="temperature", exact=True).click()
        page.get_by_label("factor", exact=True).fill("3")
        page.get_by_label("Steps", exact=True).fill(str(STEPS))
        page.get_by_label("Seed", exact=True).fill("7")
        page.get_by_label("Randomize seed").uncheck()
        expect(page.get_by_label("Steps", exact=True)).to_have_value(str(STEPS))
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
            pixels(download), reference_image("toy-flux", PROMPT, 7, technique="temperature", factor=3.0)
        )

        page.get_by_role("tab", name="Benchmarks / Info").click()
        page.get_by_role("button", name="Check this machine", exact=True).click()
        expect(page.get_by_text("attention backend", exact=True)).to_be_visible(timeout=120_000)
        page.screenshot(path=str(shots / "ui_info.png"), full_page=True)
    check_screenshots(shots, "ui_generate.png", "ui_info.png")


def test_astar_tab_in_a_real_browser(tmp_path):
    """A-STAR tab: Show tokens fills the word picker, ticking words writes the concepts, Run shows the A-STAR image,
    the stock image and the maps; the downloaded image carries the concepts picked in the browser."""
    expect = playwright.expect
    with app_page(tmp_path) as (page, shots):
        page.get_by_role("tab", name="A-STAR").click()
        open_advanced(page)

        def field(name: str):
            return page.get_by_label(name, exact=True).filter(visible=True)

        field("Prompt").fill("a cat and a zebra")
        page.get_by_role("button", name="Show tokens", exact=True).click()
        for word in ("cat", "zebra"):
            field(word).check()
        concepts = page.get_by_role("textbox", name=re.compile("^Concepts")).filter(visible=True)
        expect(concepts).to_have_value("cat, zebra")
        expect(page.get_by_role("gridcell", name="br", exact=True)).to_be_visible()  # token 7, in "zebra"
        field("Steps").fill(str(STEPS))
        field("Seed").fill("3")
        page.get_by_label("Randomize seed").filter(visible=True).uncheck()
        expect(field("Steps")).to_have_value(str(STEPS))
        page.get_by_role("button", name="Run", exact=True).filter(visible=True).click()

        images = page.locator('img[src*="gradio_api/file="]').filter(visible=True)
        expect(images).to_have_count(3, timeout=120_000)  # A-STAR, stock, maps
        expect(field("Seed")).to_have_value("3")
        page.screenshot(path=str(shots / "ui_astar.png"), full_page=True)
        href = page.get_by_test_id("download-link").filter(visible=True).first.get_attribute("href")
        download = tmp_path / "astar.png"
        download.write_bytes(page.request.get(href).body())
        params = read_parameters(download)
        assert params["image"] == "astar" and params["concepts"] == ["cat", "zebra"]
        assert params["seed"] == 3 and params["steps"] == STEPS and params["token_indices"] == [[2], [5, 6, 7, 8]]
        # a new prompt has other tokens: the old words leave the picker (issue 21: they stayed ticked)
        field("Prompt").fill("a dog and a horse")
        expect(field("cat")).to_have_count(0)
        expect(page.get_by_role("gridcell", name="br", exact=True)).to_have_count(0)
    check_screenshots(shots, "ui_astar.png")


def test_a_newcomer_clicks_through_every_tab_and_technique(tmp_path):
    """Issue 21, as a newcomer: the UI as `attnpack ui` builds it (default model toy-flux, every registered technique,
    default settings), each tab's first example clicked and Run pressed; on Generate, every technique of the
    dropdown with its fields left empty. Each run shows a new image and no error toast."""
    from attnpack.techniques import available_techniques

    expect = playwright.expect
    executable = chromium_path()
    demo = build_demo(device="cpu")  # what `attnpack ui` serves
    with launched(demo) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url, wait_until="networkidle")
            errors = page.locator(".toast-body.error, .toast-wrap .error")

            def run_and_wait(label: str, images: int = 1) -> None:
                shown = page.locator('img[src*="gradio_api/file="]').filter(visible=True)
                before = [shown.nth(i).get_attribute("src") for i in range(shown.count())]
                page.get_by_role("button", name="Run", exact=True).filter(visible=True).click()
                expect(shown.nth(images - 1)).to_be_visible(timeout=120_000)
                expect(shown.first).not_to_have_attribute("src", before[0] if before else "-", timeout=120_000)
                assert errors.count() == 0, f"{label}: {errors.first.inner_text()}"

            def first_example() -> None:
                page.locator(".gallery-item, tr.tr-body").filter(visible=True).first.click()

            first_example()
            for name in available_techniques():
                page.get_by_label("Attention technique").click()
                page.get_by_role("option", name=name, exact=True).click()
                run_and_wait(f"Generate -t {name}")
            for tab, images in (("Head guidance", 1), ("IR-Diffusion", 1), ("A-STAR", 3)):
                page.get_by_role("tab", name=tab).click()
                first_example()
                run_and_wait(tab, images)
            page.get_by_role("tab", name="Benchmarks / Info").click()
            page.get_by_role("button", name="Run benchmark", exact=True).click()
            expect(page.locator('img[src*="gradio_api/file="]').filter(visible=True).first).to_be_visible(
                timeout=180_000
            )
            assert errors.count() == 0, f"Benchmarks: {errors.first.inner_text()}"
        finally:
            browser.close()
