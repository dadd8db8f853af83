"""The README's screenshot of `loupe view`: the slide page of the demo's first predicted slide, the cell the model
read most often clicked (its patch shown in the panel).

    python scripts/viewer_screenshot.py                       # runs `loupe demo --out runs/demo` first if needed
    python scripts/viewer_screenshot.py --demo runs/demo --out docs/viewer.png

Drives Debian's Chromium (/usr/bin/chromium) through Playwright, against the viewer served on loopback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loupe.viewer.cohort import open_cohort
from loupe.viewer.server import background_server

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `loupe demo` output folder")
    parser.add_argument("--out", type=Path, default=Path("docs/viewer.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=860)
    args = parser.parse_args()
    predict = args.demo / "predict"
    if not (predict / "status.json").is_file():
        from loupe.workflows.demo import run_demo

        run_demo(out=args.demo, progress_bar=False)
    first = next(r.slide_id for r in open_cohort(predict).rows() if r.status == "done")

    from playwright.sync_api import sync_playwright

    with background_server(predict) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(f"{url}slide/{first}")
        page.wait_for_selector("body[data-tiles=loaded]", timeout=60_000)
        page.wait_for_selector("body[data-layers=loaded]", timeout=60_000)
        page.eval_on_selector("#opacity", "el => { el.value = 55; el.dispatchEvent(new Event('input')); }")
        top = page.get_attribute("#cells li >> nth=0", "data-cell")  # the cell drawn most often
        page.click(f".cell-outline[data-cell='{top}']")  # its patch in the panel; the whole slide stays in view
        page.wait_for_function("() => document.getElementById('patch').naturalWidth > 0")
        page.wait_for_timeout(500)
        box = page.locator("#viewer").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)  # the value under the cursor
        page.wait_for_timeout(300)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out} (slide {first} of {predict})")


if __name__ == "__main__":
    main()
