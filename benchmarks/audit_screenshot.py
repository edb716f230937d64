"""Screenshot of an audit report's index page with headless Chromium, for the README.

    python benchmarks/audit_screenshot.py runs/audit/index.html   # -> benchmarks/results/audit_screenshot.png

Chromium on Debian: `apt-get install -y chromium`. The page is opened from disk (file://), as a reader would.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from saealign._io import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 1400) -> Path:
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    if browser is None:
        raise FileNotFoundError("no Chromium found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as scratch, atomic_path(out) as tmp:
        shot = Path(scratch) / "shot.png"  # Chromium writes only to a name ending in .png
        # --no-sandbox: Chromium refuses to run as root with its sandbox (containers); the page is our own file
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={Path(scratch) / 'profile'}", f"--window-size={width},{height}",
                        f"--screenshot={shot}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
        if not shot.is_file() or shot.stat().st_size == 0:
            raise RuntimeError(f"Chromium wrote no screenshot of {page}")
        shutil.copyfile(shot, tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the report's index.html")
    parser.add_argument("--output", type=Path, default=RESULTS / "audit_screenshot.png")
    args = parser.parse_args()
    print(screenshot(args.page, args.output))


if __name__ == "__main__":
    main()
