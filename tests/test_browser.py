"""The web page at `/`, end to end in headless Chromium: pick an image and chat about it, the answers streamed
from /v1/chat/completions and equal to the server's own (/v1/ask, or the whole conversation).

Needs Debian's `chromium` and `chromium-driver` packages and `selenium` (in the `test` extra). When the
browser is missing the set-up installs it with apt-get (as root); the test skips only if that fails.
A screenshot is saved to test-artifacts/browser.png."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")

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


def chat(url: str, messages: list[dict]) -> str:
    """The server's answer to a whole conversation, not streamed (what the page must have shown)."""
    reply = httpx.post(url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def send(driver, wait: WebDriverWait, text: str) -> object:
    """Type ``text`` (or nothing: a caption) and wait for its streamed answer; the answer's element."""
    before = len(driver.find_elements(By.CSS_SELECTOR, "#log li[data-done]"))
    driver.find_element(By.ID, "question").send_keys(text, Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log li[data-done]")) == before + 1)
    return driver.find_elements(By.CSS_SELECTOR, "#log li")[-1].find_element(By.CLASS_NAME, "a")


def test_page_chats_about_an_upload_with_streamed_answers(chromium, pipe, tmp_path):
    served = Served(pipe, ServerSettings(options=OPTIONS))
    try:
        image = tmp_path / "upload.png"
        image.write_bytes(png(8, size=(96, 72)))
        data = image.read_bytes()
        picture = decoded(data)
        first, second = "how many shapes are there?", "w7"
        caption = pipe.caption([picture], "", OPTIONS)[0]
        answer, alone = (pipe.ask([picture], [q], OPTIONS)[0] for q in (first, second))  # what /v1/ask answers
        wait = WebDriverWait(chromium, 30)

        chromium.get(served.url + "/")
        assert chromium.title == "BLIP-2"
        preview = chromium.find_element(By.ID, "preview")  # nothing to show yet: no broken-image icon
        assert preview.get_attribute("hidden") == "true" and not preview.is_displayed()
        assert preview.size == {"height": 0, "width": 0}
        assert chromium.find_element(By.ID, "question").get_attribute("disabled") == "true"
        chromium.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("naturalWidth") == "96")
        assert chromium.find_element(By.ID, "preview").is_displayed()

        streamed = send(chromium, wait, first)
        assert streamed.text == answer
        assert int(streamed.get_attribute("data-chunks")) >= 2  # the text grew piece by piece
        assert chromium.find_element(By.ID, "log").get_attribute("data-sent") == "1"
        # the second turn carries the first: its answer is the server's to the whole conversation
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                {"type": "text", "text": first}]},
                   {"role": "assistant", "content": answer}, {"role": "user", "content": second}]
        expected = chat(served.url, history)
        assert expected != alone  # (so the history visibly changes this answer)
        assert send(chromium, wait, second).text == expected
        assert chromium.find_element(By.ID, "log").get_attribute("data-sent") == "3"
        assert send(chromium, wait, "").text == caption  # no text: a caption, of the image alone
        assert chromium.find_element(By.ID, "log").get_attribute("data-sent") == "1"
        rows = chromium.find_elements(By.CSS_SELECTOR, "#log li")
        assert [r.find_element(By.CLASS_NAME, "q").text for r in rows] == [first, second, "(caption)"]
        assert chromium.find_element(By.ID, "status").text == ""
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "browser.png"
        assert chromium.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        chromium.find_element(By.ID, "clear").click()
        assert chromium.find_elements(By.CSS_SELECTOR, "#log li") == []
        assert send(chromium, wait, second).text == alone  # a new chat: no history
        assert chromium.find_element(By.ID, "log").get_attribute("data-sent") == "1"

        text_file = tmp_path / "notes.png"
        text_file.write_text("not really a picture")
        chromium.find_element(By.ID, "file").send_keys(str(text_file))
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#log li"))
        chromium.find_element(By.ID, "question").send_keys(first, Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "status").text != "")
        assert chromium.find_element(By.ID, "status").text == (
            "the uploaded file is not an image in an accepted format (PNG, JPEG, WebP, GIF, BMP, TIFF)")
        assert chromium.find_elements(By.CSS_SELECTOR, "#log li") == []  # the failed turn is not kept
        assert not chromium.find_element(By.ID, "preview").is_displayed()
    finally:
        served.close()
