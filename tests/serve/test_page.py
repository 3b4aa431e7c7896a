"""The search page at ``GET /`` in real headless Chromium (Debian's ``chromium`` +
``chromium-driver``, driven with Selenium): type a query -> image hits render; upload an image ->
captions.  The browser may only resolve 127.0.0.1 and runs with background networking off."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("headless Chromium is required: apt-get install -y chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"          # Selenium Manager must never download anything
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--disable-domain-reliability", "--window-size=1200,900",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def test_text_query_renders_image_grid(serve_app, browser):
    from selenium.webdriver.common.by import By

    client, cfg = serve_app
    browser.get(client.base_url + "/")
    assert "align-ray" in browser.title
    box = browser.find_element(By.ID, "q")
    box.send_keys("smiling face")
    browser.find_element(By.ID, "search-btn").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .hit img")) == cfg.page_k)
    loaded = "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
    _wait(browser, lambda d: d.execute_script(loaded))
    shown = [int(e.get_attribute("data-id")) for e in browser.find_elements(By.CSS_SELECTOR, "#grid .hit")]
    expected = [h["id"] for h in client.search(text="smiling face", k=cfg.page_k, modality="image")]
    assert shown == expected
    assert browser.find_element(By.ID, "error").text == ""


def test_image_upload_lists_captions(serve_app, browser, corpus, tmp_path):
    from selenium.webdriver.common.by import By

    client, _ = serve_app
    path = tmp_path / "query.png"
    path.write_bytes(corpus["rows"][6]["image"])
    browser.get(client.base_url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#captions li")) > 0)
    shown = [int(e.get_attribute("data-id")) for e in browser.find_elements(By.CSS_SELECTOR, "#captions li")]
    expected = client.search(image=str(path), k=10, modality="text", dedup=True)
    assert shown == [h["id"] for h in expected]
    first = browser.find_element(By.CSS_SELECTOR, "#captions li").text
    # the browser collapses whitespace (the corpus plants "UPPER-CASED  " caption copies)
    assert first.startswith(" ".join(expected[0]["text"].split()))


def test_page_shows_api_errors(serve_app, browser):
    from selenium.webdriver.common.by import By

    client, cfg = serve_app
    browser.get(client.base_url + "/")
    browser.find_element(By.ID, "q").send_keys("x" * (cfg.limits.max_text_chars + 5))
    browser.find_element(By.ID, "search-btn").click()
    _wait(browser, lambda d: "limit" in d.find_element(By.ID, "error").text)
