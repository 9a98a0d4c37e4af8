"""The chat page at / in a real headless Chromium: a typed question streams back the greedy answer.

Needs Debian's chromium and chromium-driver and PyPI's selenium: `make test-browser` installs them and
runs this file; without them it is skipped.
"""

import shutil

import pytest
import torch

from dataset import load_tokenizer
from model import TinyMindForCausalLM

from conftest import Server, greedy, tiny_config

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make test-browser)")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="no chromium/chromedriver installed (make test-browser installs them)")


def test_the_page_streams_the_greedy_answer_and_keeps_the_conversation():
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400, initializer_range=0.1)).eval()
    server = Server(model, load_tokenizer())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        browser.get(server.url + "/")
        for field, value in (("temperature", "0"), ("max_tokens", "16")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        expected = greedy(server.client(), "你好", 16).choices[0].message.content
        for turn in (1, 2):
            browser.find_element(By.ID, "input").send_keys("你好", Keys.ENTER)
            WebDriverWait(browser, 60).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == turn)
        replies = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
        assert replies[0] == expected.strip()
        assert len(browser.find_elements(By.CSS_SELECTOR, ".user")) == 2  # the conversation is kept
        assert "tokens/s" in browser.find_element(By.ID, "speed").text
        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        browser.quit()
        server.stop()
