"""The web page at `/`, end to end in headless Chromium: upload an image, read its caption, ask questions.

Needs Debian's `chromium` and `chromium-driver` packages and `selenium` (in the `test` extra). When the
browser is missing the set-up installs it with apt-get (as root); the test skips only if that fails.
A screenshot is saved to test-artifacts/browser.png."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from test_server import OPTIONS, Served, decoded, png

from blip2.apps.pipeline import Pipeline
from blip2.apps.server import ServerSettings

APT_PACKAGES = ["chromium", "chromium-driver"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def browser_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def install_chromium() -> str:
    """apt-get install the browser; returns why it could not ("" when it worked)."""
    if not shutil.which("apt-get"):
        return "no apt-get on this system"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd, limit in ((["apt-get", "update", "-qq"], 300), (["apt-get", "install", "-y", "-qq", *APT_PACKAGES], 600)):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} took over {limit} s"
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}"
    return ""


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    if browser_paths() is None:
        reason = install_chromium()
        if browser_paths() is None:
            pytest.skip(f"headless Chromium is not available and could not be installed "
                        f"(apt-get install {' '.join(APT_PACKAGES)}): {reason or 'binaries not found after install'}")
    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=800,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


def test_page_captions_an_upload_and_answers_questions(chromium, pipe, tmp_path):
    served = Served(pipe, ServerSettings(options=OPTIONS))
    try:
        image = tmp_path / "upload.png"
        image.write_bytes(png(8, size=(96, 72)))
        picture = decoded(image.read_bytes())
        caption = pipe.caption([picture], "", OPTIONS)[0]
        answers = [pipe.ask([picture], [q], OPTIONS)[0] for q in ("w5 w6", "w7")]
        wait = WebDriverWait(chromium, 30)

        chromium.get(served.url + "/")
        assert chromium.title == "BLIP-2"
        preview = chromium.find_element(By.ID, "preview")  # nothing to show yet: no broken-image icon
        assert preview.get_attribute("hidden") == "true" and not preview.is_displayed()
        assert preview.size == {"height": 0, "width": 0}
        chromium.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "caption").text not in ("", "…"))
        assert chromium.find_element(By.ID, "caption").text == caption
        assert chromium.find_element(By.ID, "preview").get_attribute("naturalWidth") == "96"
        assert chromium.find_element(By.ID, "preview").is_displayed()

        for n, question in enumerate(("w5 w6", "w7"), 1):
            box = chromium.find_element(By.ID, "question")
            box.send_keys(question, Keys.ENTER)
            wait.until(lambda d, n=n: len(d.find_elements(By.CSS_SELECTOR, "#answers li[data-done]")) == n)
        rows = chromium.find_elements(By.CSS_SELECTOR, "#answers li")
        assert [r.find_element(By.CLASS_NAME, "q").text for r in rows] == ["w5 w6 →", "w7 →"]
        assert [r.find_element(By.CLASS_NAME, "a").text for r in rows] == answers
        assert chromium.find_element(By.ID, "status").text == ""
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "browser.png"
        assert chromium.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        text_file = tmp_path / "notes.png"
        text_file.write_text("not really a picture")
        chromium.find_element(By.ID, "file").send_keys(str(text_file))
        wait.until(lambda d: d.find_element(By.ID, "status").text != "")
        assert chromium.find_element(By.ID, "status").text == (
            "the uploaded file is not an image in an accepted format (PNG, JPEG, WebP, GIF, BMP, TIFF)")
        assert chromium.find_element(By.ID, "caption").text == ""
    finally:
        served.close()
