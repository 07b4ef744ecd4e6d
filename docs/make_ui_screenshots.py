"""Screenshots of the web UI for docs/ui.md, taken in headless Chromium (Debian's `chromium` driven by Playwright).

    python docs/make_ui_screenshots.py          # docs/images/ui_{generate,head_guidance,ir_diffusion,astar,info}.png
    python docs/make_ui_screenshots.py astar    # only the named ones

Runs the UI on the built-in tiny models on the CPU (random weights: the images are noise), with every registered
technique: a GNA generation on the Generate tab (tiny FLUX), a heads x softness grid on the Head guidance tab (tiny
FLUX), a two-subject scene with box masks on the IR-Diffusion tab (tiny SDXL), concepts picked from the prompt's
tokens and the result next to the stock image on the A-STAR tab (tiny SD 1.5), and the machine report plus a
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


SHOTS = ("generate", "head_guidance", "ir_diffusion", "astar", "info")


def main(names: list[str]) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from playwright.sync_api import expect, sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    from test_ui_support import CHROMIUM_ARGS, launched  # the browser test's flags and launcher

    from attnpack.ui import build_demo

    unknown = sorted(set(names) - set(SHOTS))
    if unknown:
        raise SystemExit(f"unknown screenshots {unknown}; choose from {', '.join(SHOTS)}")
    names = list(names or SHOTS)
    chromium = os.environ.get("ATTNPACK_CHROMIUM", "/usr/bin/chromium")
    OUT.mkdir(exist_ok=True)

    def label(page, text: str):
        return page.get_by_label(text, exact=True).filter(visible=True)

    def advanced(page, steps: str, seed: str) -> None:
        page.get_by_text("Advanced settings").filter(visible=True).click()
        expect(label(page, "Steps")).to_be_visible()  # a field filled while it mounts can lose its value
        label(page, "Steps").fill(steps)
        page.get_by_label("Randomize seed").filter(visible=True).uncheck()
        label(page, "Seed").fill(seed)
        expect(label(page, "Steps")).to_have_value(steps)

    def generate(page) -> None:
        page.get_by_label("Attention technique").click()
        page.get_by_role("option", name="gna", exact=True).click()
        window = page.get_by_role("textbox", name=re.compile("^window_size")).filter(visible=True)
        window.fill("3, 3")
        label(page, "Prompt").fill("a red circle left of a blue square")
        advanced(page, "4", "7")
        page.get_by_role("button", name="Run", exact=True).click()
        expect(page.locator('img[src*="gradio_api/file="]')).to_be_visible(timeout=300_000)

    def head_guidance(page) -> None:
        page.get_by_role("tab", name="Head guidance").click()
        label(page, "Prompt").fill("a lighthouse on a cliff at night")
        page.get_by_role("textbox", name=re.compile("^Heads")).fill("L0H0; L1; L2")
        page.get_by_text("Comparison grid: heads x softness").click()
        label(page, "Softness values").fill("0, 0.5, 1")
        advanced(page, "4", "7")
        page.get_by_role("button", name="Make grid", exact=True).click()
        expect(page.locator('img[src*="gradio_api/file="]').filter(visible=True)).to_be_visible(timeout=300_000)

    def ir_diffusion(page) -> None:
        page.get_by_role("tab", name="IR-Diffusion").click()
        label(page, "Prompt").fill("a cat and a dog on the beach")
        page.get_by_label("boxes").first.check()  # target masks from the table's boxes
        advanced(page, "4", "7")
        page.get_by_role("button", name="Run", exact=True).filter(visible=True).click()
        gallery = page.locator('img[src*="gradio_api/file="]').filter(visible=True)
        expect(gallery.nth(3)).to_be_visible(timeout=300_000)

    def astar(page) -> None:
        page.get_by_role("tab", name="A-STAR").click()
        label(page, "Prompt").fill("a cat and a zebra")
        page.get_by_role("button", name="Show tokens", exact=True).click()
        for word in ("cat", "zebra"):
            label(page, word).check()
        advanced(page, "10", "7")
        page.get_by_role("button", name="Run", exact=True).filter(visible=True).click()
        images = page.locator('img[src*="gradio_api/file="]').filter(visible=True)
        expect(images).to_have_count(3, timeout=300_000)  # A-STAR, stock, maps

    def info(page) -> None:
        page.get_by_role("tab", name="Benchmarks / Info").click()
        page.get_by_role("button", name="Check this machine", exact=True).click()
        expect(page.get_by_text("attention backend", exact=True)).to_be_visible(timeout=300_000)
        page.get_by_label("Technique to compare").click()
        page.get_by_role("option", name="gna", exact=True).click()
        page.get_by_role("textbox", name=re.compile("^window_size")).filter(visible=True).fill("3, 3")
        page.get_by_role("button", name="Run benchmark", exact=True).click()
        expect(page.get_by_role("gridcell", name="gna", exact=True)).to_be_visible(timeout=300_000)

    shots = dict(generate=generate, head_guidance=head_guidance, ir_diffusion=ir_diffusion, astar=astar, info=info)
    with launched(build_demo(device="cpu", max_cached_models=2)) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, wait_until="networkidle")
            for name in names:
                shots[name](page)
                page.screenshot(path=str(OUT / f"ui_{name}.png"), full_page=True)
            browser.close()
    for name in names:
        path = OUT / f"ui_{name}.png"
        _save_small(path)
        print(f"wrote {path} ({path.stat().st_size // 1000} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
