"""`dhf-cache view` in a real browser: headless Chromium (Debian's, with its chromedriver) driven
by selenium clicks a pixel of the source photo; the page draws the similarity heatmap over the
target, and the argmax it shows is `match_points`'s for that pixel.

One browser session for the whole test (it is the slow part). A screenshot is written for the
developer to look at: to $DHF_VIEWER_SCREENSHOTS when set, else to the test's tmp folder.
Without Chromium the test is skipped (apt-get install chromium chromium-driver), except under
CI (the variable CI set), where a missing browser is a failure: CI's .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_viewer import raw_maps, start_viewer, stored_descriptors, viewer_setting
from dhf_cache.correspondence.matching import match_points

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def browser_or_skip() -> tuple[str, str]:
    """(browser, driver) executables, or skip (fail under CI) saying what to install."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which(DRIVER) or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None)
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    reason = ("no headless Chromium to drive: `apt-get install chromium chromium-driver` (Debian) and "
              "`pip install -c constraints.txt -e '.[test]'` (selenium)")
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}; .ci/run installs them", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--force-device-scale-factor=1", "--no-first-run"):
        options.add_argument(argument)
    # the driver's path is given, so selenium never looks for (or downloads) one of its own
    session = webdriver.Chrome(options=options, service=Service(driver_path))
    session.set_page_load_timeout(60)
    yield session
    session.quit()


def stage(session, name: str) -> dict:
    return session.execute_script(f"return Object.assign({{}}, document.querySelector('#{name}').dataset)")


def wait(session, condition, seconds: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(session, seconds, poll_frequency=0.05).until(condition)


def test_a_click_on_the_source_draws_the_heatmap_and_match_points_argmax(driver, request, tmp_path_factory, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    # the session's cache and data, asked for once the browser is known to be there (a skip costs nothing)
    setting = viewer_setting(tmp_path_factory, request.getfixturevalue("train_cache"), request.getfixturevalue("train_data"))
    server, lines = start_viewer(setting)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/#eval=0&pair=1")
        wait(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "1")
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None, driver.find_element(By.ID, "error").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")
        assert len(rows) == len((setting.evals[0] / "predictions.jsonl").read_text().splitlines())
        pair = driver.execute_script("return state.pair")
        assert pair["i"] == 1 and driver.execute_script("return state.pickers.a.key()") == "ckpt:0"
        source = driver.find_element(By.ID, "src-stage")
        wait(driver, lambda d: d.execute_script("return document.querySelector('#src-stage img.photo').complete"))
        width, height = source.size["width"], source.size["height"]
        offset = (round(width * 0.3), round(height * 0.6))  # from the element's top-left corner
        ActionChains(driver).move_to_element_with_offset(source, offset[0] - width // 2, offset[1] - height // 2).click().perform()
        wait(driver, lambda d: stage(d, "trg-stage-a").get("state") == "drawn")
        clicked, target = stage(driver, "src-stage"), stage(driver, "trg-stage-a")
        x, y = float(clicked["clickX"]), float(clicked["clickY"])
        (w, h) = pair["src_size"]
        # the page turned the click into original source pixels
        assert abs(x - offset[0] * w / width) <= w / width + 1e-6 and abs(y - offset[1] * h / height) <= h / height + 1e-6
        heat = driver.execute_script("const i = document.querySelector('#trg-stage-a img.heat'); "
                                     "return [i.complete, i.naturalWidth, i.naturalHeight, getComputedStyle(i).display]")
        load = int(target["loadSize"])
        assert heat == [True, load, load, "block"] and load == 64  # the evaluation's load size
        expected = match_points(stored_descriptors(setting)(pair["src"]), stored_descriptors(setting)(pair["trg"]),
                                [[x, y]], pair["src_size"], pair["trg_size"], load)[0]
        assert [float(target["argmaxX"]), float(target["argmaxY"])] == [float(expected[0]), float(expected[1])]
        assert "argmax" in driver.find_element(By.ID, "click-info").text
        # side by side with a raw map: both heatmaps, each with match_points' argmax
        driver.execute_script(f"state.pickers.b.set({setting.raw_key!r}); document.querySelector('#compare').click();")
        ActionChains(driver).move_to_element_with_offset(source, offset[0] - width // 2, offset[1] - height // 2).click().perform()
        wait(driver, lambda d: stage(d, "trg-stage-b").get("state") == "drawn" and stage(d, "trg-stage-a").get("state") == "drawn")
        raw = raw_maps(setting, setting.raw_key)
        x, y = float(stage(driver, "src-stage")["clickX"]), float(stage(driver, "src-stage")["clickY"])
        expected = match_points(raw(pair["src"]), raw(pair["trg"]), [[x, y]], pair["src_size"], pair["trg_size"], load)[0]
        assert [float(stage(driver, "trg-stage-b")["argmaxX"]), float(stage(driver, "trg-stage-b")["argmaxY"])] == \
            [float(expected[0]), float(expected[1])]
        time.sleep(0.1)  # the overlay is redrawn right after the heatmaps load
        folder = Path(os.environ.get("DHF_VIEWER_SCREENSHOTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / "viewer-click.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        # the page's JS raised nothing
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        assert not any(" 500 " in line for line in lines), lines
    finally:
        server.stop()
