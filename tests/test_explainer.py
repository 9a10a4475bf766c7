"""The explainer page: its numbers against the schedule, and the page itself in a real browser.

The browser tests drive headless Chromium through Selenium and ChromeDriver (Debian's `chromium`
and `chromium-driver`, `pip install selenium`). Where those are missing they are skipped with a
message saying what to install; under CI (CI=true) a missing browser is a failure instead.
"""
import base64
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from minidiff import cli, explainer
from minidiff.diffusion import GaussianDiffusion
from minidiff.schedule import get_named_beta_schedule

TINY = ["--ch", "8", "--ch-mult", "1", "--attn-resolutions", "--batch-size", "8", "--num-timesteps", "10",
        "--num-samples", "4", "--warmup", "2", "--no-progress"]


def run(*argv):
    return cli.main([str(a) for a in argv])


def page_data(path):
    """The JSON the page's script reads."""
    text = open(path, encoding="utf-8").read()
    return json.loads(re.search(r'<script id="minidiff-data" type="application/json">(.*?)</script>', text, re.S)[1])


def sprite_frames(chain):
    """The chain's frames decoded from its inlined PNG: uint8 (F, H, W, C)."""
    png = base64.b64decode(chain["sprite"].split(",", 1)[1])
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return sheet.reshape(len(chain["steps"]), chain["height"], chain["width"], 3)


# ---------------------------------------------------------------- the numbers


def test_readouts_match_the_schedule_tables():
    betas = get_named_beta_schedule("linear", 1000) * 1.3
    d = GaussianDiffusion(betas)
    rows = explainer.step_readouts(betas)
    assert rows[0] == {"beta": None, "alpha_bar": 1.0, "snr": None}
    for t in (1, 2, 500, 1000):                      # the paper's t is the code's t - 1
        assert rows[t]["beta"] == pytest.approx(betas[t - 1], rel=1e-15)
        assert rows[t]["alpha_bar"] == pytest.approx(d.alphas_cumprod[t - 1], rel=1e-10)
        assert rows[t]["snr"] == pytest.approx(d.alphas_cumprod[t - 1] / (1 - d.alphas_cumprod[t - 1]), rel=1e-9)


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_every_slider_position_has_its_frame(T):
    shown = set(explainer.shown_steps(T))
    for steps in explainer.STEPS_CHOICES:
        ts = explainer.frame_steps(T, steps)
        assert ts[0] == 0 and ts[-1] == T and ts == sorted(ts) and set(ts) <= shown


def test_page_on_a_mondrian_holds_a_real_forward_chain(tmp_path):
    out = tmp_path / "page.html"
    assert run("forward", "mondrian", "--image-size", 8, "--out", out) == 0
    config = page_data(out)
    assert config["T"] == 1000 and config["defaultSteps"] == 30 and config["defaultScale"] == 1.0
    chains = {c["scale"]: c for c in config["chains"]}
    assert sorted(chains) == list(explainer.SCALE_CHOICES) and {c["direction"] for c in config["chains"]} == {"forward"}
    first = sprite_frames(chains[1.0])
    assert chains[1.0]["steps"][0] == 0 and chains[1.0]["steps"][-1] == 1000
    # x_0 is the same picture in every chain; x_T is noise: its pixels no longer show the picture.
    for chain in chains.values():
        np.testing.assert_array_equal(sprite_frames(chain)[0], first[0])
    x0 = first[0].astype(float) / 127.5 - 1
    xT = first[-1].astype(float) / 127.5 - 1
    assert abs(np.corrcoef(x0.ravel(), xT.ravel())[0, 1]) < 0.3
    # a weaker schedule keeps more of the picture at the same step (alpha_bar is larger)
    mid = chains[1.0]["steps"].index(300)
    weak, strong = sprite_frames(chains[0.3])[mid], sprite_frames(chains[1.5])[mid]
    err = lambda f: np.abs(f.astype(float) - first[0]).mean()
    assert err(weak) < err(strong)


def test_page_options_are_checked(tmp_path, capsys):
    assert run("forward", "mondrian", "--steps", 12, "--out", tmp_path / "p.html") == 2
    assert "--steps" in capsys.readouterr().err
    assert run("forward", "mondrian", "--beta-scale", 1.25, "--out", tmp_path / "p.html") == 2
    assert "--beta-scale" in capsys.readouterr().err
    assert not (tmp_path / "p.html").exists()
    with pytest.raises(ValueError, match="one forward chain per noise scale"):
        explainer.render([], 1000, "x")


# ---------------------------------------------------------------- in a browser


def _browser_or_skip():
    """A headless Chromium driven by Selenium, or a skip (a failure under CI) saying what is missing."""
    missing = []
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        missing.append("Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver)")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run installs them, so CI must not skip this test")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    options.binary_location = chromium
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    yield driver
    driver.quit()


def canvas_pixels(driver):
    """What the page's canvas shows, as uint8 (H, W, 3)."""
    w, h, flat = driver.execute_script(
        "const c = document.getElementById('view'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
        "return [c.width, c.height, Array.from(d.data)];")
    return np.asarray(flat, dtype=np.uint8).reshape(h, w, 4)[..., :3]


def press(driver, element_id, key, times=1):
    from selenium.webdriver.common.by import By
    element = driver.find_element(By.ID, element_id)
    for _ in range(times):
        element.send_keys(key)


def text(driver, element_id):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id).text


def wait_drawn(driver):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete) && document.body.dataset.t !== undefined"))


def test_sliders_move_the_picture_and_the_numbers(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    out = tmp_path / "page.html"
    assert run("forward", "mondrian", "--image-size", 16, "--out", out) == 0
    config = page_data(out)
    chains = {c["scale"]: c for c in config["chains"]}
    browser.get(out.as_uri())
    wait_drawn(browser)
    assert text(browser, "out-t").startswith("t = 0") and text(browser, "frame-value") == "0 of 30"
    np.testing.assert_array_equal(canvas_pixels(browser), sprite_frames(chains[1.0])[0])

    press(browser, "frame", Keys.ARROW_RIGHT, 15)            # halfway along 30 steps: t = 500
    wait_drawn(browser)
    assert text(browser, "out-t") == "t = 500 of T = 1000"
    betas = get_named_beta_schedule("linear", 1000)
    alpha_bar = np.prod(1 - betas[:500])
    assert float(text(browser, "out-beta")) == pytest.approx(betas[499], rel=1e-3)
    assert float(text(browser, "out-alpha-bar")) == pytest.approx(alpha_bar, rel=1e-3)
    np.testing.assert_array_equal(canvas_pixels(browser), sprite_frames(chains[1.0])[chains[1.0]["steps"].index(500)])
    browser.save_screenshot(str(tmp_path / "halfway.png"))
    assert Image.open(tmp_path / "halfway.png").size[0] > 500

    press(browser, "scale", Keys.ARROW_RIGHT, 5)             # 1.0 -> 1.5: every beta x 1.5
    wait_drawn(browser)
    assert text(browser, "scale-value") == "1.5" and text(browser, "out-t") == "t = 500 of T = 1000"
    assert float(text(browser, "out-beta")) == pytest.approx(1.5 * betas[499], rel=1e-3)
    np.testing.assert_array_equal(canvas_pixels(browser), sprite_frames(chains[1.5])[chains[1.5]["steps"].index(500)])

    press(browser, "steps", Keys.ARROW_LEFT, 4)              # 30 -> 10 steps; the position keeps its fraction
    wait_drawn(browser)
    assert text(browser, "steps-value") == "10" and text(browser, "frame-value") == "5 of 10"
    assert text(browser, "out-t") == "t = 500 of T = 1000"
    press(browser, "frame", Keys.END)
    wait_drawn(browser)
    assert text(browser, "out-t") == "t = 1000 = T of T = 1000"
    assert browser.execute_script("return document.getElementById('dir-reverse').disabled")
    assert text(browser, "forward-note") == ""   # a real picture: nothing to explain


def test_reverse_process_of_a_checkpoint_in_the_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    assert run("train", "--out", tmp_path / "run", "--steps", 2, *TINY) == 0
    out = tmp_path / "reverse.html"
    assert run("forward", "--checkpoint", tmp_path / "run", "--num", 4, "--steps", 10, "--out", out) == 0
    config = page_data(out)
    reverse = [c for c in config["chains"] if c["direction"] == "reverse"]
    assert config["T"] == 10 and len(reverse) == 1 and sorted(reverse[0]["steps"]) == list(range(11))
    forward = {c["scale"]: c for c in config["chains"] if c["direction"] == "forward"}
    # the forward chains start from the reverse chain's own samples x_0
    np.testing.assert_array_equal(sprite_frames(forward[1.0])[0], sprite_frames(reverse[0])[reverse[0]["steps"].index(0)])

    browser.get(out.as_uri())
    wait_drawn(browser)
    note = browser.find_element(By.ID, "forward-note").text
    assert "model's own sample" in note and "not from a real image" in note
    browser.find_element(By.ID, "dir-reverse").click()
    wait_drawn(browser)
    assert text(browser, "out-t") == "t = 10 = T of T = 10"
    assert browser.execute_script("return document.getElementById('scale').disabled")
    press(browser, "frame", Keys.END)
    wait_drawn(browser)
    assert text(browser, "out-t").startswith("t = 0")
    np.testing.assert_array_equal(canvas_pixels(browser), sprite_frames(reverse[0])[reverse[0]["steps"].index(0)])
