"""Open viewer pages in headless Chromium (driven by selenium): the browser the viewer's tests run in,
and the screenshots of the docs.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and
``pip install selenium``. Chromium starts with a fresh profile and without its background network
traffic (updates, sync, QUIC), so it runs on an offline machine.

Usage::

    python -m gnn_transformer.viz.browser page.html shot.png --hover 10 --receptive 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
BINARIES = ("chromium", "chromium-browser", "google-chrome")


def missing() -> str | None:
    """Why a headless Chromium cannot start here (``None`` when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not any(shutil.which(b) for b in BINARIES):
        return f"no Chromium found (none of {', '.join(BINARIES)} on PATH; apt-get install chromium)"
    if shutil.which("chromedriver") is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def start_chromium(width: int = 1500, height: int = 950) -> Any:
    """A selenium ``webdriver.Chrome`` on headless Chromium with a fresh profile, its console log
    readable with ``driver.get_log("browser")``. The caller quits it."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"Cannot start a headless Chromium: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    class Chrome(webdriver.Chrome):
        """``webdriver.Chrome`` that removes its profile directory when it quits."""

        profile_dir: str

        def quit(self) -> None:
            try:
                super().quit()
            finally:
                shutil.rmtree(self.profile_dir, ignore_errors=True)

    options = webdriver.ChromeOptions()
    options.binary_location = next(path for path in map(shutil.which, BINARIES) if path is not None)
    profile = tempfile.mkdtemp(prefix="gnn-transformer-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.profile_dir = profile  # removed by quit()
    return driver


def open_page(driver: Any, path: str | Path, timeout: float = 10.0) -> list[dict]:
    """Load a viewer page from a file, wait until it has drawn, and return the browser log's errors."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).resolve().as_uri())
    WebDriverWait(driver, timeout).until(
        lambda d: (
            d.execute_script("return document.body.getAttribute('data-ready')") == "1"
            or any(e["level"] == "SEVERE" for e in d.get_log("browser"))
        )
    )
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def hover(driver: Any, token: int) -> None:
    """Move the mouse onto ``token``'s node in the drawing."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    node = driver.find_element(By.CSS_SELECTOR, f"#graph circle.node[data-node='{token}']")
    ActionChains(driver).move_to_element(node).perform()


def set_receptive(driver: Any, layers: int) -> None:
    """Set the receptive-field slider to ``layers``."""
    driver.execute_script(
        "var s = document.getElementById('rf-slider'); s.value = arguments[0];s.dispatchEvent(new Event('input'));",
        str(layers),
    )


def screenshot(
    page: str | Path,
    png: str | Path,
    *,
    hover_token: int | None = None,
    receptive: int = 0,
    width: int = 1500,
    height: int = 950,
) -> Path:
    """Save a PNG of a viewer page as Chromium draws it (optionally with a token hovered and the
    receptive-field slider set); a ``RuntimeError`` when the page logs a JavaScript error."""
    driver = start_chromium(width, height)
    try:
        errors = open_page(driver, page)
        if errors:
            raise RuntimeError(f"The page {str(page)!r} logged JavaScript errors: {errors}")
        if receptive:
            set_receptive(driver, receptive)
        if hover_token is not None:
            hover(driver, hover_token)
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    return Path(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot a viewer page in headless Chromium.")
    parser.add_argument("page", help="HTML file written by 'gnn-transformer view'")
    parser.add_argument("png", help="output PNG")
    parser.add_argument("--hover", type=int, help="token to hover")
    parser.add_argument("--receptive", type=int, default=0, help="receptive-field slider position")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=950)
    args = parser.parse_args(argv)
    try:
        out = screenshot(
            args.page, args.png, hover_token=args.hover, receptive=args.receptive, width=args.width, height=args.height
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
