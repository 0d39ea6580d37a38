"""The chat page in a real headless Chromium: ask, watch the answer stream into the page, keep the conversation,
show tokens/s, load nothing from elsewhere; a screenshot is written to the test's tmp folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve_helpers import openai_client, serving

import edgekit

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def page_server(tiny_llama_package: Path) -> Iterator[tuple[str, edgekit.Model]]:
    from edgekit.serve import create_app

    with edgekit.load(tiny_llama_package) as model:
        app = create_app(model, model_name="tiny")
        with serving(app) as url:
            yield url, model
        app.state.edgekit.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,800"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def ask(driver: Any, question: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "question")
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 120).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, ".message.assistant")
            and d.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("data-state") != "streaming"
        )
    )
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def test_the_chat_page_streams_answers_and_keeps_the_conversation(page_server: tuple[str, edgekit.Model],
                                                                  browser: Any, tmp_path: Path) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = page_server
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))

    # Count the answer's text updates: a streamed answer grows piece by piece, not in one write.
    browser.execute_script(
        "window.textUpdates = 0; new MutationObserver((records) => { window.textUpdates += records.length; })"
        ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
    )
    first = ask(browser, "What is the capital of France?")
    assert first.get_attribute("data-state") == "done", first.text
    answer = first.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    client = openai_client(url)
    expected = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=MAX_TOKENS,
                                              temperature=0).choices[0].message.content  # fmt: skip
    assert answer == expected
    assert "tokens/s" in first.find_element(By.CSS_SELECTOR, ".meta").text
    assert browser.execute_script("return window.textUpdates") > 4  # two messages, a meta line, and the pieces

    second = ask(browser, "And of Italy?")
    assert second.get_attribute("data-state") == "done", second.text
    conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    expected = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=MAX_TOKENS,
                                              temperature=0).choices[0].message.content  # fmt: skip
    assert second.find_element(By.CSS_SELECTOR, ".text").get_property("textContent") == expected
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.user")) == 2

    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(url) for name in resources), resources
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_new_chat_clears_the_conversation(page_server: tuple[str, edgekit.Model], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = page_server
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
    ask(browser, "hello")
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
