"""The chat page at / in a real headless Chromium: a typed question streams back the greedy answer; with the
server's tools, the thinking folds away and each call and its result show in the conversation (behind an API key
too); "New chat" mid-answer starts clean, and a failure mid-stream shows the server's words.

Needs Debian's chromium and chromium-driver and PyPI's selenium: `make test-browser` installs them and
runs this file; without them it is skipped.
"""

import shutil

import pytest
import torch

from dataset import load_tokenizer
from model import TinyMindForCausalLM

from conftest import QUESTION, Server, greedy, tiny_config
from trainer.tools import load_tools

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make test-browser)")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="no chromium/chromedriver installed (make test-browser installs them)")


def browse(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    browser.get(server.url + "/")
    return browser


def ask(browser, text, replies):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    for field, value in (("temperature", "0"), ("max_tokens", "200")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    WebDriverWait(browser, 60).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == replies
        and not b.find_element(By.ID, "send").get_attribute("disabled"))


def test_the_page_streams_the_greedy_answer_and_keeps_the_conversation():
    from selenium.webdriver.common.by import By

    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400, initializer_range=0.1)).eval()
    server = Server(model, load_tokenizer())
    browser = browse(server)
    try:
        expected = greedy(server.client(), "你好", 200).choices[0].message.content
        for turn in (1, 2):
            ask(browser, "你好", turn)
        replies = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
        assert replies[0] == expected.strip()
        assert len(browser.find_elements(By.CSS_SELECTOR, ".user")) == 2  # the conversation is kept
        assert "tokens/s" in browser.find_element(By.ID, "speed").text
        assert not browser.find_element(By.ID, "use_tools").is_displayed()  # this server offers no tools
        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        browser.quit()
        server.stop()


def test_the_page_folds_the_thinking_and_shows_each_call_and_result(tool_caller):
    from selenium.webdriver.common.by import By

    _, model = tool_caller
    server = Server(model, load_tokenizer(), context=1024, tools=load_tools("calculator"))
    browser = browse(server)
    try:
        ask(browser, QUESTION, 2)  # the call, then the answer to its result
        calling, answering = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        thinking = calling.find_element(By.CSS_SELECTOR, "details.thinking")
        assert thinking.is_displayed() and thinking.get_attribute("open") is None  # folded
        assert thinking.get_attribute("textContent") == "thinkingUse the calculator."
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".call, .result")] == [
            '→ calculator({"expression": "17*23"})', "← 391"]
        assert answering.text == "17*23 = 391."
    finally:
        browser.quit()
        server.stop()


def test_behind_an_api_key_the_tools_are_offered_once_the_key_is_given(tool_caller):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, model = tool_caller
    server = Server(model, load_tokenizer(), context=1024, tools=load_tools("calculator"), api_key="sesame")
    browser = browse(server)
    try:
        assert not browser.find_element(By.ID, "use_tools").is_displayed()  # not listed without the key
        browser.find_element(By.ID, "api_key").send_keys("sesame", Keys.TAB)
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "use_tools").is_displayed())
        ask(browser, QUESTION, 2)  # the call, then the answer to its result
        assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text == "17*23 = 391."
    finally:
        browser.quit()
        server.stop()


def test_a_new_chat_during_an_answer_starts_clean_and_a_failure_mid_stream_shows_the_servers_words(monkeypatch):
    """"New chat" while an answer streams: the answer's end must not join the new conversation (its next request
    would open with an assistant turn, a 400). A model failing mid-stream: the page shows the server's error."""
    import time

    import model.generate
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    decode, fail = model.generate.Decoder.decode, []

    def slow(self, rows, tokens, positions):  # about 4 s for 200 tokens: time to press "New chat" mid-answer
        time.sleep(0.02)
        if fail:
            raise RuntimeError("out of memory (simulated)")
        return decode(self, rows, tokens, positions)

    monkeypatch.setattr(model.generate.Decoder, "decode", slow)
    torch.manual_seed(0)
    server = Server(TinyMindForCausalLM(tiny_config(vocab_size=6400, initializer_range=0.1)).eval(), load_tokenizer())
    browser = browse(server)
    try:
        for field, value in (("temperature", "0"), ("max_tokens", "200")):  # greedy: a random model writes no end
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "input").send_keys("你好", Keys.ENTER)
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant").text)
        assert browser.find_element(By.ID, "send").get_attribute("disabled")  # still answering
        browser.find_element(By.ID, "new").click()
        WebDriverWait(browser, 30).until(lambda b: not b.find_element(By.ID, "send").get_attribute("disabled"))
        ask(browser, "你好", 1)
        assert browser.find_elements(By.CSS_SELECTOR, ".error") == []
        assert browser.find_element(By.CSS_SELECTOR, ".assistant").text  # answered, not refused
        fail.append(True)
        browser.find_element(By.ID, "input").send_keys("再见", Keys.ENTER)
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".error"))
        assert "out of memory (simulated)" in browser.find_element(By.CSS_SELECTOR, ".error").text
    finally:
        browser.quit()
        server.stop()

