"""The README's and the docs' pictures of a real run, drawn by headless Chromium:

    python scripts/pictures.py outputs/<date>/<time>      # a finished run of `dialect-circuits`

writes docs/assets/report-headline.png (the section the report opens with: where the score is,
per dialect feature, and what the pairs can see; the headline section for a run without it) and
docs/assets/report-mechanism.png (the run's head-output patching figure). The run's own files are
read as they are; the headline is cut out of report.html into a page beside it, screenshotted, and
removed again.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "docs" / "assets"


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("pictures.py: needs Chromium (chromium, chromium-browser or google-chrome on PATH)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=10000", f"--screenshot={out}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"{out} ({out.stat().st_size} bytes)")


def headline_page(run: Path) -> Path:
    """The report's <head> and its first section (power, else headline) alone, as a page in the
    run directory."""
    report = (run / "report.html").read_text()
    head = report[:report.index("<body>")]
    section = (re.search(r'<section id="power">.*?</section>', report, re.S)
               or re.search(r'<section id="headline">.*?</section>', report, re.S))
    if not section:
        raise SystemExit(f"pictures.py: {run}/report.html has no headline section (did the cache stage run?)")
    page = run / ".headline-picture.html"
    page.write_text(f"{head}<body><main>{section.group(0)}</main></body></html>")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory")
    run = parser.parse_args().run
    ASSETS.mkdir(parents=True, exist_ok=True)
    page = headline_page(run)
    try:
        screenshot(page, ASSETS / "report-headline.png", 1100, 900)
    finally:
        page.unlink()
    screenshot(run / "figures" / "patch_head_out.html", ASSETS / "report-mechanism.png", 1100, 470)


if __name__ == "__main__":
    main()
