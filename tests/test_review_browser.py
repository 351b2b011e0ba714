"""The review page in headless Chromium: a reviewer answers with the keys and the buttons, the page
shows nothing that tells the sides, and a server stopped mid-review has every vote given so far."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evals.review.server import ReviewServer
from evals.review.votes import read_votes
from tests.test_review_server import CANDIDATE, finished_run  # noqa: F401 (the module's run, reused)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    HAVE_SELENIUM = False
else:
    HAVE_SELENIUM = True

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="needs chromium, chromedriver and selenium (apt-get install chromium chromium-driver; pip install selenium)",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def wait_for_progress(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "progress-text").text == text)


def test_a_review_in_chromium(finished_run: Path, tmp_path: Path, browser: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    server = ReviewServer(run_dir).start()
    try:
        browser.get(server.url)
        browser.find_element(By.ID, "name").send_keys("dana", Keys.ENTER)
        wait_for_progress(browser, "trial 1 of 16")
        given: list[str] = []
        steps = [(Keys.ARROW_LEFT, "left"), (Keys.SPACE, "cant_tell"), (Keys.ARROW_RIGHT, "right")]
        steps += [("btn-right", "right"), ("btn-cant", "cant_tell"), ("btn-left", "left")]
        for how, answer in steps:
            loaded = browser.execute_script(
                "return [...document.querySelectorAll('#pair img')].map(i => i.complete && i.naturalWidth)"
            )
            assert all(loaded), loaded
            source = browser.page_source.lower()
            for leak in (CANDIDATE, "ref", "images/", ".png"):
                assert leak not in source
            if how.startswith("btn-"):
                browser.find_element(By.ID, how).click()
            else:
                ActionChains(browser).send_keys(how).perform()
            given.append(answer)
            wait_for_progress(browser, f"trial {len(given) + 1} of 16")
        server.stop()  # mid-review, as a Ctrl-C would
        votes = read_votes(run_dir)
        assert [v.answer for v in votes] == given and [v.trial for v in votes] == list(range(len(given)))
        assert {v.reviewer for v in votes} == {"dana"}
        ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform()  # the server is gone: said, nothing written
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "error").text)
        assert len(read_votes(run_dir)) == len(given)
    finally:
        server.stop()
