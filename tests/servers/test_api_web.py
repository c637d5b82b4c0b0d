"""The restore web page in headless Chromium (Debian's chromium + chromedriver, Selenium).

Against a real standalone server: enter a token, pick round 0 on the
timeline, browse into a folder, download a file (compared byte for byte with
what round 0 wrote), start a restore and watch it reach "done", and save a
screenshot in the test's tmp dir. Then, as of the newest point, download a
file whose name is not UTF-8. All under the page's Content-Security-Policy:
the browser's console must show no violation of it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.api_helpers import ADMIN_TOKEN, ApiServer, api_toml, write_volume
from vaultsync.commands.local_servers import LocalProvider, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("chromium/chromedriver are not installed (scripts/bootstrap.sh installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        opts.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports go there
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    try:
        # The explicit driver path keeps Selenium from trying to download one.
        drv = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    except WebDriverException as e:
        pytest.skip(f"headless Chromium could not start here: {e.msg}")
    drv.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    drv.downloads = downloads  # type: ignore[attr-defined]  # where the tests look
    try:
        yield drv
    finally:
        drv.quit()


def _wait(cond: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = cond()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError("timed out waiting in the browser")


def test_browse_download_restore(
    browser: Any, tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    from selenium.webdriver.common.by import By

    root = tmp_path / "restores"
    root.mkdir()
    vol = write_volume(
        tmp_path / "vol",
        seaweedfs,
        rclone,
        api_toml(free_port(), [root], enabled=False),
        big_mib=1,
        odd_names=True,
    )
    vol.mount.umount()
    server = ApiServer(vol.mount.config, "sw", tmp_path / "serve.log")
    try:
        d = browser
        d.get(server.url + "/")  # redirects to /ui/
        d.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
        d.find_element(By.CSS_SELECTOR, "#login button").click()
        _wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#timeline button")) > 1)
        # Round 0 as the point: type its time, as a user pasting a timestamp would.
        at = d.find_element(By.ID, "at")
        at.clear()
        at.send_keys(vol.rounds[0].at)
        d.find_element(By.ID, "go").click()
        _wait(lambda: "LSN" in d.find_element(By.ID, "pointinfo").text)

        def click(kind: str, text: str) -> bool:
            for a in d.find_elements(By.CSS_SELECTOR, f"a.entry.{kind}"):
                if a.text == text:
                    a.click()  # a re-rendered table raises here; _wait tries again
                    return True
            return False

        _wait(lambda: click("dir", "docs/"))
        _wait(lambda: "/ docs" in d.find_element(By.ID, "crumbs").text)
        _wait(lambda: click("file", "a.txt"))
        got = _wait(
            lambda: (browser.downloads / "a.txt").exists() and (browser.downloads / "a.txt")
        )
        _wait(lambda: got.read_bytes() == vol.rounds[0].files["/docs/a.txt"], 10)
        # Restore the folder being browsed (the page fills in its path).
        assert d.find_element(By.ID, "rpath").get_attribute("value") == "/docs"
        d.find_element(By.ID, "rdest").send_keys("from-web")
        d.find_element(By.ID, "rstart").click()
        _wait(
            lambda: (
                d.find_element(By.CSS_SELECTOR, "#jobs li").get_attribute("data-state") == "done"
            ),
            60,
        )
        assert "done" in d.find_element(By.CSS_SELECTOR, "#jobs li").text
        assert (root / "from-web" / "a.txt").read_bytes() == vol.rounds[0].files["/docs/a.txt"]
        assert d.find_element(By.ID, "error").text == ""
        shot = tmp_path / "restore-page.png"
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        # A name that is not UTF-8, shown with U+FFFD, is still fetched by its own bytes.
        d.find_element(By.ID, "at").clear()
        d.find_element(By.ID, "go").click()
        _wait(lambda: click("dir", "odd/"))
        _wait(lambda: "/ odd" in d.find_element(By.ID, "crumbs").text)
        _wait(lambda: click("file", "caf\ufffd.txt"))
        odd = browser.downloads / "caf\ufffd.txt"
        _wait(lambda: odd.exists() and odd.read_bytes() == vol.odd[b"/odd/caf\xe9.txt"], 30)
        assert d.find_element(By.ID, "error").text == ""
        csp = [e for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
        assert csp == [], csp
    finally:
        server.stop()
        vol.mount.cleanup()
