"""``lcm serve`` end to end in a real headless Chromium: the page connects, typing a prompt and moving a slider
bring new images, and the latency is shown; Chromium's fake camera streams frames through img2img (frames per
second and the last frame's latency shown, the device released on stop), a sketch is sent as it is drawn, and a mask
painted over a chosen image makes it inpainting. ``LCM_SCREENSHOT=1`` also saves the page to
docs/images/serve.png, and in streaming mode to docs/images/serve-stream.png."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lcm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from lcm.serve import Engine, Limits, create_app  # noqa: E402
from lcm.serve.server import start_in_thread  # noqa: E402
from lcm.shipped import default_sampling_path  # noqa: E402


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
    # a synthetic camera (a moving test pattern), granted without a prompt
    options.add_argument("--use-fake-device-for-media-stream")
    options.add_argument("--use-fake-ui-for-media-stream")
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


def shown(driver) -> dict:
    """What the page says about the image on show: its request id, whether it was img2img or inpainting, its src."""
    return driver.execute_script(
        "const box = document.getElementById('images');"
        "return {id: Number(box.dataset.id || 0), img2img: box.dataset.img2img === 'true',"
        " inpaint: box.dataset.inpaint === 'true', src: box.firstElementChild.src};"
    )


def stroke(driver, element_id: str, points: list[tuple[float, float]]) -> None:
    """Drag the mouse through ``points`` (fractions of the element's width and height) over an element."""
    element = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    width, height = element.size["width"], element.size["height"]
    offsets = [(round((x - 0.5) * width), round((y - 0.5) * height)) for x, y in points]  # from the centre
    chain = ActionChains(driver).move_to_element_with_offset(element, *offsets[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(offsets, offsets[1:], strict=False):
        chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()


def test_the_camera_streams_frames_and_shows_their_rate(server, browser):
    browser.get(server.url)
    wait_for_more_images(browser, 0)
    browser.find_element(By.ID, "camera").click()
    frames: set[str] = set()

    def distinct_frames(driver) -> bool:
        now = shown(driver)
        if now["img2img"]:
            frames.add(now["src"])
        return len(frames) >= 4

    WebDriverWait(browser, 30, poll_frequency=0.05).until(distinct_frames, "the camera did not stream 4 frames")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-camera") == "on"
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "fps").text != "–")
    assert float(browser.find_element(By.ID, "fps").text) > 0
    assert float(browser.find_element(By.ID, "frame-ms").text) > 0
    if os.environ.get("LCM_SCREENSHOT") == "1":  # the page in streaming mode, for the README
        browser.save_screenshot(str(SCREENSHOT.with_name("serve-stream.png")))
    browser.execute_script("window.cameraTracks = document.getElementById('video').srcObject.getTracks();")

    browser.find_element(By.ID, "camera").click()  # now "stop camera"
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-camera") == "off"
    states = browser.execute_script("return window.cameraTracks.map((track) => track.readyState);")
    assert states and set(states) == {"ended"}  # the device is released
    assert browser.execute_script("return document.getElementById('video').srcObject") is None
    WebDriverWait(browser, 30).until(lambda d: not shown(d)["img2img"], "no text-to-image after the camera stopped")


def test_a_sketch_is_sent_as_it_is_drawn(server, browser):
    browser.get(server.url)
    wait_for_more_images(browser, 0)
    browser.find_element(By.ID, "draw").click()
    WebDriverWait(browser, 30).until(lambda d: shown(d)["img2img"], "the blank sketch was not sent")
    blank = shown(browser)
    stroke(browser, "sketch", [(0.3, 0.2), (0.5, 0.5), (0.7, 0.8), (0.3, 0.8)])
    WebDriverWait(browser, 30).until(lambda d: shown(d)["id"] > blank["id"], "no image after the stroke")
    WebDriverWait(browser, 30).until(lambda d: shown(d)["src"] != blank["src"], "the stroke changed nothing")
    assert shown(browser)["img2img"] and not shown(browser)["inpaint"]
    assert browser.find_element(By.ID, "error").text == ""


def test_a_painted_mask_makes_it_inpainting(server, browser, tmp_path):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.linspace(0, 255, 48 * 48).reshape(48, 48).astype(np.uint8)).save(picture)
    browser.get(server.url)
    wait_for_more_images(browser, 0)
    browser.find_element(By.ID, "file").send_keys(str(picture))
    WebDriverWait(browser, 30).until(lambda d: shown(d)["img2img"], "the chosen image was not sent")
    assert not shown(browser)["inpaint"] and browser.find_element(By.ID, "strength-value").text == "0.6"

    stroke(browser, "mask", [(0.2, 0.2), (0.8, 0.3), (0.8, 0.6)])
    WebDriverWait(browser, 30).until(lambda d: shown(d)["inpaint"], "no inpainting after painting a mask")
    assert browser.find_element(By.ID, "strength-value").text == "1"  # inpainting's default, the slider untouched
    sent = browser.execute_script("return maskImage();")  # what the requests carry: white = repaint, at 32x32
    with Image.open(io.BytesIO(base64.b64decode(sent.partition(",")[2]))) as mask:
        values = np.asarray(mask.convert("L"))
    assert values.shape == (32, 32) and set(np.unique(values)) == {0, 255}
    assert values[8, 16] == 255 and values[31, 0] == 0  # on the stroke; far from it
    assert browser.find_element(By.ID, "error").text == ""

    browser.find_element(By.ID, "clear-mask").click()
    WebDriverWait(browser, 30).until(lambda d: not shown(d)["inpaint"], "the mask outlived clear mask")
    assert shown(browser)["img2img"] and browser.find_element(By.ID, "strength-value").text == "0.6"
