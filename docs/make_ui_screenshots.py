"""Screenshots of the web UI for docs/ui.md, taken in headless Chromium (Debian's `chromium` driven by Playwright).

    python docs/make_ui_screenshots.py            # writes docs/images/ui_generate.png and docs/images/ui_info.png

Runs the UI on the built-in tiny FLUX model on the CPU (random weights: the images are noise), with every
registered technique: a GNA generation on the Generate tab, and the machine report plus a GNA-vs-stock benchmark on
the Benchmarks / Info tab. Set ATTNPACK_CHROMIUM to use another Chromium binary.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


def _save_small(path: Path, limit: int = 200_000) -> None:
    """Re-save the screenshot with an adaptive palette when it is larger than ``limit`` bytes."""
    if path.stat().st_size > limit:
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)


def main() -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from playwright.sync_api import expect, sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    from test_ui_support import CHROMIUM_ARGS, launched  # the browser test's flags and launcher

    from attnpack.ui import build_demo

    chromium = os.environ.get("ATTNPACK_CHROMIUM", "/usr/bin/chromium")
    OUT.mkdir(exist_ok=True)
    with launched(build_demo(device="cpu")) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, wait_until="networkidle")
            page.get_by_label("Attention technique").click()
            page.get_by_role("option", name="gna", exact=True).click()
            window = page.get_by_role("textbox", name=re.compile("^window_size")).filter(visible=True)
            window.fill("3, 3")
            page.get_by_label("Prompt").fill("a red circle left of a blue square")
            page.get_by_text("Advanced settings").click()
            page.get_by_label("Steps", exact=True).fill("4")
            page.get_by_label("Randomize seed").uncheck()
            page.get_by_label("Seed", exact=True).fill("7")
            page.get_by_role("button", name="Run", exact=True).click()
            expect(page.locator('img[src*="gradio_api/file="]')).to_be_visible(timeout=300_000)
            page.screenshot(path=str(OUT / "ui_generate.png"), full_page=True)

            page.get_by_role("tab", name="Benchmarks / Info").click()
            page.get_by_role("button", name="Check this machine", exact=True).click()
            expect(page.get_by_text("attention backend", exact=True)).to_be_visible(timeout=300_000)
            page.get_by_label("Technique to compare").click()
            page.get_by_role("option", name="gna", exact=True).click()
            window.fill("3, 3")
            page.get_by_role("button", name="Run benchmark", exact=True).click()
            expect(page.get_by_role("gridcell", name="gna", exact=True)).to_be_visible(timeout=300_000)
            page.screenshot(path=str(OUT / "ui_info.png"), full_page=True)
            browser.close()
    for name in ("ui_generate.png", "ui_info.png"):
        _save_small(OUT / name)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size // 1000} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
