"""The browser playground at `/`, driven in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium): streaming, JSON mode, a tool call answered, and the
"view code" snippets run unchanged against the server."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import KEY, ROOT, free_port

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (scripts/e2e.sh installs them)")

DESKTOP = (1280, 900)
PHONE = (390, 844)


def make_browser(size):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    if size == PHONE:
        # Headless windows stop shrinking near 500 px: emulate the phone's viewport instead.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": True})
    return driver


@pytest.fixture
def browser():
    driver = make_browser(DESKTOP)
    yield driver
    driver.quit()


def open_page(driver, server):
    driver.get(server.base + "/")
    # The server needs a key: the page says so until one is typed.
    WebDriverWait(driver, 30).until(lambda d: "API key" in d.find_element(By.ID, "model-status").text)
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    key.send_keys(Keys.TAB)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.getElementById('model').options.length") > 0)
    set_value(driver, "temperature", "0")


def set_value(driver, field_id, value):
    field = driver.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(value)


def assistant_count(driver):
    return len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))


def wait_answer(driver, before):
    """Waits for the assistant turn after `before` ones to finish; returns its bubble."""
    WebDriverWait(driver, 120).until(
        lambda d: assistant_count(d) > before and not d.find_elements(By.CSS_SELECTOR, ".msg.assistant[aria-busy]"))
    bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[before]
    assert "error" not in bubble.get_attribute("class"), bubble.text
    return bubble


def send(driver, text):
    before = assistant_count(driver)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)  # the keyboard path: Enter sends
    return wait_answer(driver, before)


def answer_text(bubble):
    return bubble.find_element(By.CSS_SELECTOR, ".answer").text


def test_page_is_served_without_a_key_and_with_a_strict_policy(server):
    for path, kind in (("/", "text/html"), ("/playground.js", "text/javascript"), ("/playground.css", "text/css")):
        r = httpx.get(server.base + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(server.base + "/v1/models").status_code == 401


def test_a_message_streams_in_with_its_figures(browser, server):
    open_page(browser, server)
    set_value(browser, "max-tokens", "48")
    # Every change of the answer's text, as the page makes it.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const a = document.querySelectorAll('.msg.assistant .answer');
          if (a.length) window.seen.push(a[a.length - 1].textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    bubble = send(browser, "Write one sentence about the sea.")
    text = answer_text(bubble)
    assert text.strip()
    partial = {s for s in browser.execute_script("return window.seen") if s and s != text}
    assert len(partial) >= 2, f"the answer arrived in one piece, not streamed: {partial}"
    assert all(text.startswith(p) for p in partial)
    stats = bubble.find_element(By.CSS_SELECTOR, ".stats")
    assert int(stats.get_attribute("data-tokens")) > 0
    assert "first token" in stats.text and "tokens/s" in stats.text


def test_json_mode_answers_valid_json(browser, server):
    open_page(browser, server)
    set_value(browser, "max-tokens", "80")
    browser.find_element(By.ID, "json-mode").click()
    bubble = send(browser, "Describe a cat with a name and an age.")
    assert isinstance(json.loads(answer_text(bubble)), dict)


def test_a_tool_call_is_answered_and_the_model_replies(browser, server):
    open_page(browser, server)
    set_value(browser, "max-tokens", "60")
    browser.find_element(By.ID, "example-tool").click()
    Select(browser.find_element(By.ID, "tool-choice")).select_by_value("required")
    bubble = send(browser, "What is the weather in Paris?")
    call = bubble.find_element(By.CSS_SELECTOR, ".tool-call").text
    assert call.startswith("call get_weather(")
    # Answer the call; the next turn may only talk.
    Select(browser.find_element(By.ID, "tool-choice")).select_by_value("none")
    result = bubble.find_element(By.CSS_SELECTOR, ".tool-answers textarea")
    result.send_keys('{"temperature_c": 18, "sky": "clear"}')
    before = assistant_count(browser)
    bubble.find_element(By.CSS_SELECTOR, ".tool-answers button[type=submit]").click()
    final = wait_answer(browser, before)
    assert answer_text(final).strip()
    assert not final.find_elements(By.CSS_SELECTOR, ".tool-call")
    tool = browser.find_element(By.CSS_SELECTOR, ".msg.tool").text
    assert "temperature_c" in tool


def view_code(driver, lang):
    driver.find_element(By.ID, "view-code").click()
    driver.find_element(By.ID, f"tab-{lang}").click()
    code = driver.find_element(By.ID, "code").text
    driver.find_element(By.ID, "close-code").click()
    return code


def run_python(code, tmp_path, name):
    script = tmp_path / name
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TAIPAN_API_KEY": KEY})


def test_view_code_runs_unchanged_with_both_sdks(browser, server, tmp_path):
    open_page(browser, server)
    set_value(browser, "max-tokens", "24")
    set_value(browser, "system", "You are terse.")
    browser.find_element(By.ID, "add-document").click()
    browser.find_element(By.CSS_SELECTOR, "#documents textarea").send_keys("The tide tables for Brest.")
    send(browser, "Hello!")
    browser.find_element(By.ID, "prompt").send_keys("Name one sea creature.")
    snippets = {lang: view_code(browser, lang) for lang in ("curl", "ai21", "openai")}
    for lang, code in snippets.items():
        assert KEY not in code, f"the {lang} snippet leaks the API key"
        assert "Name one sea creature." in code and "The tide tables for Brest." in code
    assert '"Authorization: Bearer $TAIPAN_API_KEY"' in snippets["curl"]
    for lang in ("ai21", "openai"):
        done = run_python(snippets[lang], tmp_path, f"snippet_{lang}.py")
        assert done.returncode == 0, f"{lang} snippet failed:\n{snippets[lang]}\n{done.stderr}"
        assert done.stdout.strip(), f"{lang} snippet printed nothing"
    curl = subprocess.run(["bash", "-c", snippets["curl"]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TAIPAN_API_KEY": KEY})
    assert curl.returncode == 0 and '"content"' in curl.stdout and "[DONE]" in curl.stdout, curl.stdout


def test_keyboard_only_and_narrow_screens(server, tmp_path):
    driver = make_browser(PHONE)
    try:
        open_page_on_phone(driver, server)
        fits = driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert fits, "the page scrolls sideways on a phone"
        # Settings start folded on a phone; the toggle opens them.
        assert not driver.find_element(By.ID, "settings").is_displayed()
        toggle = driver.find_element(By.ID, "toggle-settings")
        assert toggle.get_attribute("aria-expanded") == "false"
        toggle.send_keys(Keys.ENTER)
        assert driver.find_element(By.ID, "settings").is_displayed()
        toggle.send_keys(Keys.ENTER)
        send(driver, "Say hi.")
        # The dialog opens from the keyboard and Escape closes it.
        driver.find_element(By.ID, "view-code").send_keys(Keys.ENTER)
        assert driver.find_element(By.ID, "code-dialog").is_displayed()
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        WebDriverWait(driver, 5).until(lambda d: not d.find_element(By.ID, "code-dialog").is_displayed())
        save_screenshot(driver, tmp_path, "playground-phone.png")
    finally:
        driver.quit()


def open_page_on_phone(driver, server):
    driver.get(server.base + "/")
    WebDriverWait(driver, 30).until(lambda d: "API key" in d.find_element(By.ID, "model-status").text)
    driver.find_element(By.ID, "toggle-settings").click()
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    key.send_keys(Keys.TAB)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.getElementById('model').options.length") > 0)
    set_value(driver, "temperature", "0")
    set_value(driver, "max-tokens", "40")
    driver.find_element(By.ID, "toggle-settings").click()


def test_desktop_screenshot(browser, server, tmp_path):
    open_page(browser, server)
    set_value(browser, "max-tokens", "60")
    set_value(browser, "system", "You are a helpful assistant.")
    send(browser, "Give me two tips for a first sailing trip.")
    save_screenshot(browser, tmp_path, "playground-desktop.png")


def save_screenshot(driver, tmp_path, name):
    """Into tmp_path; with TAIPAN_SCREENSHOTS=1 into docs/ too (how the README's images are made)."""
    assert driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("TAIPAN_SCREENSHOTS") == "1":
        shutil.copy(tmp_path / name, Path(ROOT) / "docs" / name)


def test_run_script_prints_progress_and_summary_and_the_playground_answers_there():
    """`scripts/run.sh` (the README's first command) says what it does, ends with the summary,
    and the playground URL it prints serves the page."""
    port = free_port()
    log = open(ROOT / "target" / f"e2e-run-sh-{port}.log", "w+")
    proc = subprocess.Popen(["bash", "scripts/run.sh", "--port", str(port), "-t", "2"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        text = ""
        while "playground" not in text:
            assert proc.poll() is None, text
            assert time.time() < deadline, text
            time.sleep(0.5)
            text = Path(log.name).read_text()
        time.sleep(0.5)
        text = Path(log.name).read_text()
        for said in ("mapping and repacking", "loaded", "starting the engine", "ready in", "AI21 API", "threads"):
            assert said in text, f"{said!r} missing from:\n{text}"
        url = re.search(r"playground\s+(http://\S+)", text).group(1)
        page = httpx.get(url)
        assert page.status_code == 200 and "taipan playground" in page.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_thinking_block_streams_open_then_folds_away(browser, server):
    """A reasoning model's <think> block, as the page renders it chunk by chunk (driven through
    the page's own renderer: the default model does not think)."""
    open_page(browser, server)
    states = browser.execute_script("""
        const box = document.createElement('div');
        document.body.append(box);
        const seen = [];
        const show = (content) => {
          renderChoice(box, {content, toolCalls: []});
          const d = box.querySelector('details.thinking');
          seen.push([d.open, d.querySelector('summary').textContent, d.textContent.includes('weigh'),
                     box.querySelector('.answer').textContent]);
        };
        show('<think>I weigh the options');
        show('<think>I weigh the options</think>\\n\\nTake the boat.');
        box.querySelector('details.thinking').open = true;  // the user opens it
        show('<think>I weigh the options</think>\\n\\nTake the boat. Now.');
        return seen;
    """)
    assert states[0] == [True, "Thinking…", True, ""]
    assert states[1] == [False, "Thinking", True, "Take the boat."]
    assert states[2] == [True, "Thinking", True, "Take the boat. Now."]
    # The server's own split (reasoning_content beside content) renders the same way.
    split = browser.execute_script("""
        const box = document.createElement('div');
        document.body.append(box);
        const seen = [];
        const show = (choice) => {
          renderChoice(box, {toolCalls: [], ...choice});
          const d = box.querySelector('details.thinking');
          seen.push([d.open, d.querySelector('summary').textContent, d.textContent.includes('weigh'),
                     box.querySelector('.answer').textContent]);
        };
        show({content: '', reasoning: 'I weigh the options'});
        show({content: 'Take the boat.', reasoning: 'I weigh the options'});
        show({content: '', reasoning: 'I weigh the options', done: true});
        return seen;
    """)
    assert split[0] == [True, "Thinking…", True, ""]
    assert split[1] == [False, "Thinking", True, "Take the boat."]
    assert split[2] == [False, "Thinking", True, ""]
