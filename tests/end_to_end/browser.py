"""The real browser the page's tests drive: Debian's Chromium through Playwright (which cannot
download a browser of its own here)."""

from __future__ import annotations

from playwright.sync_api import Browser, Playwright

CHROMIUM = "/usr/bin/chromium"
#: as root (CI) Chromium needs --no-sandbox; no GPU, and /dev/shm may be small in a container
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
