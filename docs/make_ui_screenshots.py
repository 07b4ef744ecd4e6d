"""Screenshots of the web UI for docs/ui.md, taken in headless Chromium (Debian's `chromium` driven by Playwright).

    python docs/make_ui_screenshots.py            # writes docs/images/ui_{generate,head_guidance,ir_diffusion,info}.png

Runs the UI on the built-in tiny models on the CPU (random weights: the images are noise), with every registered
technique: a GNA generation on the Generate tab (tiny FLUX), a heads x softness grid on the Head guidance tab (tiny
FLUX), a two-subject scene with box masks on the IR-Diffusion tab (tiny SDXL), and the machine report plus a
GNA-vs-stock benchmark on the Benchmarks / Info tab. Set ATTNPACK_CHROMIUM to use another Chromium binary.
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

    def label(page, text: str):
        return page.get_by_label(text, exact=True).filter(visible=True)

    def advanced(page, steps: str, seed: str) -> None:
        page.get_by_text("Advanced settings").filter(visible=True).click()
        label(page, "Steps").fill(steps)
        page.get_by_label("Randomize seed").filter(visible=True).uncheck()
        label(page, "Seed").fill(seed)

    with launched(build_demo(device="cpu", max_cached_models=2)) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, wait_until="networkidle")
            page.get_by_label("Attention technique").click()
            page.get_by_role("option", name="gna", exact=True).click()
            window = page.get_by_role("textbox", name=re.compile("^window_size")).filter(visible=True)
            window.fill("3, 3")
            label(page, "Prompt").fill("a red circle left of a blue square")
            advanced(page, "4", "7")
            page.get_by_role("button", name="Run", exact=True).click()
            expect(page.locator('img[src*="gradio_api/file="]')).to_be_visible(timeout=300_000)
            page.screenshot(path=str(OUT / "ui_generate.png"), full_page=True)

            page.get_by_role("tab", name="Head guidance").click()
            label(page, "Prompt").fill("a lighthouse on a cliff at night")
            page.get_by_role("textbox", name=re.compile("^Heads")).fill("L0H0; L1; L2")
            page.get_by_text("Comparison grid: heads x softness").click()
            label(page, "Softness values").fill("0, 0.5, 1")
            advanced(page, "4", "7")
            page.get_by_role("button", name="Make grid", exact=True).click()
            expect(page.locator('img[src*="gradio_api/file="]').filter(visible=True)).to_be_visible(timeout=300_000)
            page.screenshot(path=str(OUT / "ui_head_guidance.png"), full_page=True)

            page.get_by_role("tab", name="IR-Diffusion").click()
            label(page, "Prompt").fill("a cat and a dog on the beach")
            page.get_by_label("boxes").first.check()  # target masks from the table's boxes
            advanced(page, "4", "7")
            page.get_by_role("button", name="Run", exact=True).filter(visible=True).click()
            gallery = page.locator('img[src*="gradio_api/file="]').filter(visible=True)
            expect(gallery.nth(3)).to_be_visible(timeout=300_000)
            page.screenshot(path=str(OUT / "ui_ir_diffusion.png"), full_page=True)

            page.get_by_role("tab", name="Benchmarks / Info").click()
            page.get_by_role("button", name="Check this machine", exact=True).click()
            expect(page.get_by_text("attention backend", exact=True)).to_be_visible(timeout=300_000)
            page.get_by_label("Technique to compare").click()
            page.get_by_role("option", name="gna", exact=True).click()
            page.get_by_role("textbox", name=re.compile("^window_size")).filter(visible=True).fill("3, 3")
            page.get_by_role("button", name="Run benchmark", exact=True).click()
            expect(page.get_by_role("gridcell", name="gna", exact=True)).to_be_visible(timeout=300_000)
            page.screenshot(path=str(OUT / "ui_info.png"), full_page=True)
            browser.close()
    for name in ("ui_generate.png", "ui_head_guidance.png", "ui_ir_diffusion.png", "ui_info.png"):
        _save_small(OUT / name)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size // 1000} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
