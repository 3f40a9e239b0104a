"""``lcm serve`` end to end in a real headless Chromium: the page connects, typing a prompt and moving a slider
bring new images, and the latency is shown. ``LCM_SCREENSHOT=1`` also saves the page to docs/images/serve.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "/usr/bin/chromium")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or shutil.which("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve.png"

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "headless browser test skipped: chromium and chromedriver are not installed "
        "(bash scripts/install-browser.sh installs them)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="headless browser test skipped: selenium is missing")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lcm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from lcm.sample import default_sampling_path  # noqa: E402
from lcm.serve import Engine, Limits, create_app  # noqa: E402
from lcm.serve.server import start_in_thread  # noqa: E402


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as lcm serve runs on the CPU
    limits = Limits()
    engine = Engine(LatentDiffusion.from_pretrained(default_sampling_path()))
    running = start_in_thread(create_app(engine, limits), limits)
    yield running
    running.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def count(driver) -> int:
    return int(driver.find_element(By.ID, "count").text)


def first_src(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#images img").get_attribute("src")


def wait_for_more_images(driver, than: int) -> int:
    WebDriverWait(driver, 30).until(lambda d: count(d) > than, f"no new image after {than}")
    return count(driver)


def test_typing_and_sliders_redraw_the_image(server, browser):
    browser.get(server.url)
    first = wait_for_more_images(browser, 0)  # the page asks for an image as soon as it connects
    assert browser.find_element(By.ID, "connection").text == "connected"
    assert "lcm sampler" in browser.find_element(By.ID, "model").text  # the shipped LCM
    image = browser.find_element(By.CSS_SELECTOR, "#images img")
    before = image.get_attribute("src")
    assert before.startswith("data:image/png;base64,")
    # shown large and sharp, though the model draws 32x32
    assert image.value_of_css_property("image-rendering") == "pixelated"
    assert image.size["width"] >= 128

    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys("a red dress")
    typed = wait_for_more_images(browser, first)
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#images img").get_attribute("src") != before
    )
    for field in ("server-ms", "rtt-ms"):  # the latency is shown, as numbers
        assert float(browser.find_element(By.ID, field).text) > 0

    browser.find_element(By.ID, "seed").send_keys(Keys.ARROW_RIGHT)  # a slider move is a request too
    moved = wait_for_more_images(browser, typed)
    assert browser.find_element(By.ID, "seed-value").text == "1"
    assert browser.find_element(By.ID, "error").text == ""

    if os.environ.get("LCM_SCREENSHOT"):
        batch = browser.find_element(By.ID, "batch")
        for _ in range(3):
            batch.send_keys(Keys.ARROW_RIGHT)
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == 4)
        wait_for_more_images(browser, moved)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
