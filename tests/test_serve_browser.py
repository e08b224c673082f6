"""bindkit serve's page in a real headless browser (Debian's chromium, driven by Selenium): type a query and see
scored results; drop a WAV and see audio players and image thumbnails, the top result that same recording, a seven.

Skipped when chromium or chromedriver is missing, except under CI (the environment variable CI set), where the
browser is part of the environment and its absence is a failure."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from test_serve import galleries_for

from bind.runs import load_run
from bind.serve import background, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _need_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"no headless browser here: {', '.join(missing)} missing (apt install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the page's browser test")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def page(tiny_run, data_root, tmp_path_factory):
    """``(driver, base url)``: the app on a free port and chromium at its page."""
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    model, _ = load_run(tiny_run)
    galleries = galleries_for(model, data_root, tmp_path_factory.mktemp("gallery"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    with background(create_app(model, galleries)) as url:
        # the driver named outright: selenium-manager never looks for (or downloads) another
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            driver.get(url + "/")
            yield driver, url
        finally:
            driver.quit()


def _results(driver, wait_for: str):
    """The result rows once the status line says ``wait_for``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: wait_for in d.find_element(By.ID, "status").text)
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def test_typing_a_query_shows_scored_results(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver, _ = page
    WebDriverWait(driver, 20).until(lambda d: "Galleries:" in d.find_element(By.ID, "about").text)
    box = driver.find_element(By.ID, "query")
    box.send_keys("a handwritten seven", Keys.ENTER)
    rows = _results(driver, 'results for "a handwritten seven"')
    assert len(rows) == 10  # the page's default k
    scores = [float(row.find_element(By.CLASS_NAME, "score").text) for row in rows]
    assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
    labels = [row.find_element(By.CLASS_NAME, "label").text for row in rows]
    assert any(label.startswith("a handwritten seven") for label in labels)  # the text gallery's own prompt


def test_dropping_a_wav_shows_players_thumbnails_and_a_seven_first(page, data_root):
    from selenium.webdriver.common.by import By

    driver, _ = page
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys("30")  # every item of the three galleries: players, thumbnails and texts all show
    wav = data_root / "fsdd" / "recordings" / "7_nicolas_1.wav"
    # dropped as a person drops it: a drop event on the drop zone carrying the file (built in the page from its bytes)
    driver.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
        "const transfer = new DataTransfer();"
        "transfer.items.add(new File([bytes], arguments[1], {type: 'audio/wav'}));"
        "const zone = document.getElementById('drop');"
        "zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));"
        "zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));",
        base64.b64encode(wav.read_bytes()).decode(),
        wav.name,
    )
    rows = _results(driver, "results for 7_nicolas_1.wav (audio)")
    assert len(rows) == 30
    top = rows[0].find_element(By.CLASS_NAME, "label").text
    assert Path(top.splitlines()[0]).name == "7_nicolas_1.wav"  # the same recording: a seven
    assert top.splitlines()[0].split("/")[-1].startswith("7_")
    players = driver.find_elements(By.CSS_SELECTOR, "#results audio")
    assert len(players) == 10 and all(p.get_attribute("controls") is not None for p in players)
    thumbnails = driver.find_elements(By.CSS_SELECTOR, "#results img")
    assert len(thumbnails) == 10
    # each thumbnail really loaded from /item/image/ROW: a PNG the browser decoded to 28 x 28 pixels
    driver.execute_async_script(
        "const done = arguments[0];"
        "Promise.all([...document.querySelectorAll('#results img')].map("
        "  (img) => img.complete ? null : new Promise((ok) => { img.onload = ok; img.onerror = ok; }))).then(done);"
    )
    sizes = {(img.get_attribute("naturalWidth"), img.get_attribute("naturalHeight")) for img in thumbnails}
    assert sizes == {("28", "28")}


def test_a_file_no_modality_reads_is_refused_on_the_page(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, _ = page
    notes = tmp_path / "notes.docx"
    notes.write_bytes(b"PK\x03\x04 not a recording")
    driver.find_element(By.ID, "file").send_keys(str(notes))  # the page's file input, the other way in
    WebDriverWait(driver, 10).until(lambda d: "notes.docx" in d.find_element(By.ID, "status").text)
    status = driver.find_element(By.ID, "status")
    assert "no modality of this model reads .docx" in status.text and status.get_attribute("class") == "error"
