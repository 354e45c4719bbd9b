"""A real headless browser for tests of kvmesh's pages: Debian's chromium, driven by selenium.

``scripts/test.sh`` installs ``chromium`` and ``chromium-driver`` (``scripts/ensure_debian_packages.sh``);
selenium is given both paths, so it never looks for a browser or a driver to download.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A selenium WebDriver on a fresh headless chromium, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        raise RuntimeError("chromium and chromedriver are not on PATH: run scripts/ensure_debian_packages.sh "
                           "chromium=chromium chromedriver=chromium-driver (scripts/test.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()
