"""Render a report page in headless Chromium and save a PNG, to check by eye (or in a test)
that its tables and plots display:

    python -m reports.screenshot reports/out/ablation_masking/cpu/index.html shot.png

Needs a Chromium binary (Debian: `apt install chromium`); exit code 2 names it when missing,
fails or hangs.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 2400, timeout: float = 120) -> Path:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BROWSERS)}); "
                                f"install one, e.g. `apt install chromium`")
    if not page.is_file():
        raise FileNotFoundError(f"{page} not found; build it with `python -m reports.build` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
                        page.resolve().as_uri()], check=True, capture_output=True, timeout=timeout)
    except subprocess.CalledProcessError as err:
        last_line = (err.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{browser} exited with status {err.returncode}: {last_line}") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{browser} did not finish within {timeout:g} s; run it by hand with --headless "
                           f"--screenshot to see where it hangs") from err
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.screenshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path, help="a report's index.html")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.page, args.out, args.width, args.height))
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
