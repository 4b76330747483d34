"""Headless-browser screenshot of a page, e.g. the wanray UI of a running server.

    python scripts/screenshot.py --url http://127.0.0.1:8000/ui/ --out ui.png
    python scripts/screenshot.py --url "http://127.0.0.1:8000/ui/?run=/data/runs/exp1" --out runs.png \\
        --wait-for ".vega-embed=4" --wait-for "video=2"

Drives the system's Chromium (Debian: `apt-get install -y chromium`) through Playwright (the dev extra;
no browser download). The page is a JavaScript app that fetches its data after it loads, so the shot
is taken once every --wait-for SELECTOR=N holds (at least N elements match the CSS selector; N
defaults to 1), the page shows every --wait-for-text TEXT and the network has been idle, not after
a fixed time. --texts SELECTOR (repeatable) also writes the text of every visible element matching it
to OUT with the suffix .json ({selector: [text, ...]}): what a test reads off the page.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Quiet and offline: no background connections, which a closed network refuses many at a time.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"no headless browser found (looked for {', '.join(BROWSERS)}); install one: apt-get install -y chromium"
    )


def screenshot(
    url: str,
    out: Path,
    width: int = 1280,
    height: int = 900,
    wait_for: tuple[str, ...] = (),
    wait_for_text: tuple[str, ...] = (),
    timeout_s: float = 120,
    texts: tuple[str, ...] = (),
) -> Path:
    """Write a PNG of `url` as a `width`x`height` window once every `wait_for` "SELECTOR=N" holds and the
    page shows every `wait_for_text`; with `texts`, the visible elements' texts per selector beside it."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            for condition in wait_for:
                selector, _, count = condition.rpartition("=") if "=" in condition else (condition, "", "1")
                page.wait_for_function(
                    "([s, n]) => document.querySelectorAll(s).length >= n",
                    arg=[selector, int(count)],
                    timeout=timeout_s * 1000,
                )
            for text in wait_for_text:
                page.wait_for_function("t => document.body.innerText.includes(t)", arg=text, timeout=timeout_s * 1000)
            page.wait_for_load_state("networkidle", timeout=timeout_s * 1000)
            page.wait_for_timeout(1000)  # the plots' and videos' last paint
            page.screenshot(path=str(out))
            if texts:
                found = {
                    sel: page.eval_on_selector_all(
                        sel, "els => els.filter(e => e.getClientRects().length).map(e => e.textContent.trim())"
                    )
                    for sel in texts
                }
                out.with_suffix(".json").write_text(json.dumps(found, indent=1))
        except PlaywrightError as e:
            raise RuntimeError(f"screenshot of {url} failed: {str(e).splitlines()[0]}") from None
        finally:
            browser.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/ui/", help="page to capture")
    parser.add_argument("--out", default="ui.png", help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument(
        "--wait-for",
        action="append",
        default=[],
        metavar="SELECTOR=N",
        help="wait until at least N elements match the CSS selector (repeatable)",
    )
    parser.add_argument(
        "--wait-for-text",
        action="append",
        default=[],
        metavar="TEXT",
        help="wait until the page shows TEXT (repeatable)",
    )
    parser.add_argument(
        "--texts",
        action="append",
        default=[],
        metavar="SELECTOR",
        help="also write the visible matching elements' texts to OUT.json (repeatable)",
    )
    args = parser.parse_args()
    try:
        print(
            screenshot(
                args.url,
                Path(args.out),
                args.width,
                args.height,
                tuple(args.wait_for),
                tuple(args.wait_for_text),
                texts=tuple(args.texts),
            )
        )
    except (FileNotFoundError, RuntimeError) as e:
        print(f"screenshot.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
