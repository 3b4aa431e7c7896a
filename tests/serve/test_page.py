"""The search page at ``GET /`` in real headless Chromium (Debian's ``chromium`` +
``chromium-driver``, driven with Selenium): type a query -> image hits render; upload an image ->
captions.  The browser may only resolve 127.0.0.1 and runs with background networking off."""

from __future__ import annotations

from tests.serve.conftest import wait


def test_text_query_renders_image_grid(serve_app, browser):
    from selenium.webdriver.common.by import By

    client, cfg = serve_app
    browser.get(client.base_url + "/")
    assert "align-ray" in browser.title
    box = browser.find_element(By.ID, "q")
    box.send_keys("smiling face")
    browser.find_element(By.ID, "search-btn").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .hit img")) == cfg.page_k)
    loaded = "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
    wait(browser, lambda d: d.execute_script(loaded))
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
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#captions li")) > 0)
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
    wait(browser, lambda d: "limit" in d.find_element(By.ID, "error").text)
