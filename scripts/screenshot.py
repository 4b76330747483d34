"""Headless-browser screenshot of a page, e.g. the wanray UI of a running server.

    python scripts/screenshot.py --url http://127.0.0.1:8000/ui/ --out ui.png

Uses Chromium in headless mode (Debian: `apt-get install -y chromium`). The page is a
JavaScript app, so the browser gets a virtual-time budget to render it before the shot.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no headless browser found (looked for {', '.join(BROWSERS)}); "
                            "install one: apt-get install -y chromium")


def screenshot(url: str, out: Path, width: int = 1280, height: int = 900, render_ms: int = 15000) -> Path:
    """Write a PNG of `url` as a `width`x`height` window after `render_ms` of page time."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="wanray-chromium-") as profile:
        cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={render_ms}", f"--screenshot={out}", url]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not out.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"screenshot of {url} failed (exit {result.returncode}): {tail[0]}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/ui/", help="page to capture")
    parser.add_argument("--out", default="ui.png", help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    try:
        print(screenshot(args.url, Path(args.out), args.width, args.height))
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
