"""The web console in a real browser (Debian's headless Chromium through its
chromedriver) against a real stack with authentication on: each page loads, the
playground streams an answer, a training job's chart gains points as it trains and its
result is promoted to an alias, the models page shows it and its alias (set, roll back,
delete), two runs' loss curves overlaid, the result answering beside its base in the
playground, the usage each key made and a budget set from the Keys page, a non-admin sees
no admin controls, a bad key is refused; without authentication (the session's plain
server) a newcomer goes straight in; a failed message is a banner with Retry,
conversations survive a reload with their code blocks and have a history list; every
page fits a phone's 390 px.

``CYLLM_SCREENSHOTS=docs/console`` saves a screenshot of each page there (how the
README's pictures are made)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import DATA, MODEL, create_key, secured_config, serving

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.fail("chromium and chromedriver are needed (make browser installs Debian's)", pytrace=False)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    config = secured_config(tmp)
    admin, user = create_key(config, "ops", admin=True), create_key(config, "app", admin=False)
    with serving(tmp / "serve.log", config) as server:
        server.admin_key, server.user_key = admin, user
        yield server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-gpu",
        "--no-first-run",
    ):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager downloads nothing
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float = 30):
    """Until ``predicate`` holds; a table redrawn while it was read is read again."""
    return WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda d: predicate(d))


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def fresh_login_page(driver, base: str) -> None:
    """The login page, whoever was signed in in this tab logged out (the page's button)."""
    driver.get("about:blank")  # a hash change alone would not load the page again
    driver.get(f"{base}/console")
    wait(driver, lambda d: by_id(d, "login").is_displayed() or by_id(d, "logout").is_displayed())
    if by_id(driver, "logout").is_displayed():
        by_id(driver, "logout").click()
    wait(driver, lambda d: by_id(d, "login").is_displayed() and not by_id(d, "logout").is_displayed())


def log_in(driver, base: str, key: str) -> None:
    fresh_login_page(driver, base)
    by_id(driver, "login-key").send_keys(key)
    by_id(driver, "login-form").submit()
    wait(driver, lambda d: by_id(d, "playground").is_displayed())


def visit(driver, base: str, page: str) -> None:
    driver.get(f"{base}/console#{page}")
    wait(driver, lambda d: by_id(d, page).is_displayed())


def shoot(driver, name: str) -> None:
    folder = os.environ.get("CYLLM_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def rows(driver, table: str) -> list[list[str]]:
    return [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
    ]


def test_a_bad_key_is_refused_on_the_login_page(stack, browser):
    fresh_login_page(browser, stack.base_url)
    by_id(browser, "login-key").send_keys("cy_not-a-key")
    by_id(browser, "login-form").submit()
    wait(browser, lambda d: by_id(d, "login-error").text)
    assert "key" in by_id(browser, "login-error").text.lower()
    assert by_id(browser, "login").is_displayed()


def test_every_page_loads_for_an_admin(stack, browser):
    log_in(browser, stack.base_url, stack.admin_key)
    assert by_id(browser, "who").text == "admin"
    visit(browser, stack.base_url, "models")
    wait(browser, lambda d: rows(d, "models-table"))
    model = next(r for r in rows(browser, "models-table") if r[0] == MODEL)
    assert model[1] == "loaded" and model[-1] == "Unload"  # the admin's control
    visit(browser, stack.base_url, "cluster")
    wait(browser, lambda d: rows(d, "workers-table") and by_id(d, "cluster-status").text)
    assert by_id(browser, "cluster-status").text == "ok"
    assert rows(browser, "workers-table")[0][1] == "healthy"
    assert rows(browser, "coordinators-table")[0][1] == "yes"
    # no request yet on this server: the charts say so (the playground's test draws them)
    wait(browser, lambda d: "No traffic yet" in by_id(d, "chart-tokens").text)
    visit(browser, stack.base_url, "keys")
    wait(browser, lambda d: len(rows(d, "keys-table")) >= 2)
    assert not by_id(browser, "keys-auth-off").is_displayed()  # authentication is on here
    assert {r[1] for r in rows(browser, "keys-table")} >= {"ops", "app"}
    by_id(browser, "key-name").send_keys("console-made")
    by_id(browser, "key-form").submit()
    wait(browser, lambda d: by_id(d, "key-created").is_displayed())
    secret = next(w for w in by_id(browser, "key-created").text.split() if w.startswith("cy_"))
    assert (
        httpx.get(
            f"{stack.base_url}/v1/models", timeout=30, headers={"Authorization": f"Bearer {secret}"}
        ).status_code
        == 200
    )
    shoot(browser, "keys")


def test_the_playground_streams_an_answer(stack, browser):
    log_in(browser, stack.base_url, stack.admin_key)
    wait(browser, lambda d: Select(by_id(d, "pg-model")).options)
    assert Select(by_id(browser, "pg-model")).first_selected_option.text == MODEL
    temperature = by_id(browser, "pg-temperature")
    temperature.clear()
    temperature.send_keys("0")
    by_id(browser, "chat-input").send_keys("What is the capital of France?")
    by_id(browser, "chat-send").click()
    wait(browser, lambda d: "TTFT" in by_id(d, "chat-stats").text, timeout=60)
    answers = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant .text")
    assert "Paris" in answers[-1].text
    assert "tokens/s" in by_id(browser, "chat-stats").text
    shoot(browser, "playground")
    # The traffic it made shows on the cluster page's figures.
    stats = httpx.get(
        f"{stack.base_url}/api/v1/stats", timeout=30, headers={"Authorization": f"Bearer {stack.admin_key}"}
    ).json()
    assert sum(b["tokensPerSecond"] for b in stats["buckets"]) > 0
    assert any(b["ttftP50Ms"] for b in stats["buckets"])
    visit(browser, stack.base_url, "cluster")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-ttft canvas"))
    shoot(browser, "cluster")


def test_a_training_jobs_chart_gains_points(stack, browser):
    log_in(browser, stack.base_url, stack.admin_key)
    visit(browser, stack.base_url, "training")
    by_id(browser, "ds-file").send_keys(str(DATA / "facts.jsonl"))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ds-preview div"))
    assert "Zorblax" in by_id(browser, "ds-preview").text  # the first examples, before upload
    by_id(browser, "ds-upload").click()
    wait(browser, lambda d: "uploaded facts.jsonl" in by_id(d, "ds-result").text)
    training_file = Select(by_id(browser, "job-file")).first_selected_option.get_attribute("value")
    time.sleep(1.1)  # uploads are timed in seconds: the next one is newer
    by_id(browser, "ds-file").send_keys(str(DATA / "facts_held_out.jsonl"))
    by_id(browser, "ds-upload").click()
    wait(browser, lambda d: "uploaded facts_held_out.jsonl" in by_id(d, "ds-result").text)
    # On a fresh page the training file defaults to the newest upload.
    browser.refresh()
    wait(browser, lambda d: by_id(d, "training").is_displayed() and Select(by_id(d, "job-file")).options)
    held_out = by_id(browser, "ds-result").text  # cleared by the reload
    newest = Select(by_id(browser, "job-file")).first_selected_option.text
    assert newest.startswith("facts_held_out.jsonl") and held_out == "", newest
    Select(by_id(browser, "job-file")).select_by_value(training_file)
    Select(by_id(browser, "job-validation")).select_by_visible_text(newest)
    wait(browser, lambda d: Select(d.find_element(By.ID, "job-model")).options)
    steps = by_id(browser, "job-steps")
    steps.clear()
    steps.send_keys("8")
    by_id(browser, "job-rank").send_keys("8")
    by_id(browser, "job-promote").send_keys("console-bot")
    by_id(browser, "job-form").submit()
    wait(browser, lambda d: by_id(d, "job-detail").is_displayed())
    wait(browser, lambda d: "running · step" in by_id(d, "job-state").text, timeout=300)  # live
    wait(browser, lambda d: int(by_id(d, "chart-loss").get_attribute("data-points") or 0) >= 3, timeout=300)
    wait(browser, lambda d: by_id(d, "job-state").text.startswith("succeeded"), timeout=300)
    assert int(by_id(browser, "chart-loss").get_attribute("data-points")) == 8
    assert "eval loss" in by_id(browser, "job-state").text  # the validation file's
    wait(browser, lambda d: "promoted to console-bot" in by_id(d, "job-promotion").text)
    assert "result.eval_loss" in by_id(browser, "job-promotion").text
    wait(browser, lambda d: rows(d, "jobs-table")[0][2] == "succeeded")
    assert "max_steps 8" in by_id(browser, "job-params").text and '"r":8' in by_id(browser, "job-params").text
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#job-events div")) >= 3)
    # A second, shorter run of the same data: both loss curves on one chart.
    auth = {"Authorization": f"Bearer {stack.admin_key}"}
    second = httpx.post(
        f"{stack.base_url}/api/v1/training/start",
        headers=auth,
        timeout=30,
        json={"baseModel": MODEL, "fileId": training_file, "maxSteps": 3, "suffix": "short"},
    ).json()["id"]
    wait(browser, lambda d: [second, "succeeded"] in [r[1:3] for r in rows(d, "jobs-table")], timeout=300)
    for row in browser.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr")[:2]:
        row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    wait(browser, lambda d: by_id(d, "chart-runs").get_attribute("data-runs") == "2")
    assert by_id(browser, "chart-runs").get_attribute("data-points") == "8"  # steps 1-8, the union
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-runs .u-series")) == 3  # x and two runs
    shoot(browser, "fine-tuning")
    # The file list: both uploads; one deleted from its row.
    names = [r[0].split(" (")[0] for r in rows(browser, "files-table")]
    assert sorted(names) == ["facts.jsonl", "facts_held_out.jsonl"], names
    delete = "//table[@id='files-table']//tr[starts-with(td[1], 'facts_held_out.jsonl')]//button[.='Delete']"
    browser.find_element(By.XPATH, delete).click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: [r[0].split(" (")[0] for r in rows(d, "files-table")] == ["facts.jsonl"])
    # Opened in the playground: the result beside its base, each answering in its column.
    browser.find_element(By.XPATH, f"//table[@id='jobs-table']//tr[not(td[2]='{second}')]/td[2]").click()
    wait(browser, lambda d: not by_id(d, "job-open").get_attribute("hidden"))
    by_id(browser, "job-open").click()
    wait(browser, lambda d: by_id(d, "playground").is_displayed())
    wait(browser, lambda d: ":ft-" in Select(by_id(d, "pg-model")).first_selected_option.text)
    assert Select(by_id(browser, "pg-compare")).first_selected_option.text == MODEL
    max_tokens = by_id(browser, "pg-max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")  # two models answer on the CPU: short answers
    by_id(browser, "chat-reset").click()
    by_id(browser, "chat-input").send_keys("Who discovered Zorblax?")
    by_id(browser, "chat-send").click()
    wait(browser, lambda d: "TTFT" in by_id(d, "chat-stats").text, timeout=120)
    sides = browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.pair .side")
    assert [s.find_element(By.CSS_SELECTOR, ".role").text for s in sides][1] == MODEL
    assert all(s.find_element(By.CSS_SELECTOR, ".text").text for s in sides)
    shoot(browser, "playground-compare")


def test_usage_and_budgets_show_what_each_key_used(stack, browser):
    """After the playground's and training's traffic: the Usage page and the Keys page's
    tokens per key; a budget set from the Keys page holds at the API."""
    log_in(browser, stack.base_url, stack.admin_key)
    visit(browser, stack.base_url, "usage")
    wait(browser, lambda d: rows(d, "usage-table"), timeout=30)
    by_model = {r[0]: r for r in rows(browser, "usage-table")}
    assert MODEL in by_model and int(by_model[MODEL][1].replace(",", "")) >= 1, by_model
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-usage canvas"))
    assert "tokens today" in by_id(browser, "usage-budget").text
    Select(by_id(browser, "usage-by")).select_by_visible_text("caller")
    wait(browser, lambda d: by_id(d, "usage-key").text == "Caller")
    wait(browser, lambda d: any(r[0].startswith("key:") for r in rows(d, "usage-table")))
    shoot(browser, "usage")
    visit(browser, stack.base_url, "keys")
    wait(browser, lambda d: any(r[1] == "ops" for r in rows(d, "keys-table")))
    ops = next(r for r in rows(browser, "keys-table") if r[1] == "ops")
    assert ops[7] == time.strftime("%Y-%m-%d", time.gmtime()), ops  # last used: today (UTC)
    assert int(ops[8].replace(",", "")) > 0, ops  # the admin's tokens over 30 days
    # The app key's budget set in place: 1 token a day refuses its next request.
    edit = "//table[@id='keys-table']//tr[td[2]='app']//button[.='%s']"
    browser.find_element(By.XPATH, edit % "Edit").click()
    browser.find_element(By.CSS_SELECTOR, "#keys-table .budget-day").send_keys("1")
    browser.find_element(By.XPATH, edit % "Save").click()
    wait(browser, lambda d: "1/day" in next(r for r in rows(d, "keys-table") if r[1] == "app")[9])
    refused = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.user_key}"},
        timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    browser.find_element(By.XPATH, edit % "Edit").click()
    browser.find_element(By.CSS_SELECTOR, "#keys-table .budget-day").clear()
    browser.find_element(By.XPATH, edit % "Save").click()  # both empty: no budget
    wait(browser, lambda d: next(r for r in rows(d, "keys-table") if r[1] == "app")[9].startswith("none"))


def test_the_models_page_shows_made_models_and_their_aliases(stack, browser):
    """After the training test: its result, its evaluation and the alias it was promoted to."""
    log_in(browser, stack.base_url, stack.admin_key)
    visit(browser, stack.base_url, "models")
    wait(browser, lambda d: rows(d, "aliases-table"))
    alias, result = rows(browser, "aliases-table")[0][:2]
    assert alias == "console-bot" and ":ft-" in result
    made = next(r for r in rows(browser, "models-table") if r[0] == result)
    assert made[7].startswith("adapter · ftjob-") and made[6] == MODEL, made  # its base, its job
    assert float(made[8]) > 0 and made[9] == "console-bot", made
    assert "Export" in made[10] and "Delete" in made[10]
    checkpoint = next(r for r in rows(browser, "models-table") if r[0] == f"{result}-step-8")
    assert checkpoint[1] == "available" and checkpoint[7].startswith("adapter")  # loaded when asked for
    shoot(browser, "models")
    # point a new alias at the base, from the form
    by_id(browser, "alias-name").send_keys("base-bot")
    Select(by_id(browser, "alias-model")).select_by_visible_text(MODEL)
    by_id(browser, "alias-form").submit()
    wait(browser, lambda d: ["base-bot", MODEL] in [r[:2] for r in rows(d, "aliases-table")])
    # a rollback with nowhere to go says why
    browser.find_element(
        By.XPATH, "//table[@id='aliases-table']//tr[td='console-bot']//button[.='Roll back']"
    ).click()
    wait(browser, lambda d: "nowhere else to roll back to" in by_id(d, "models-error").text)
    # published to every tenant from its row, and withdrawn
    publish = f"//table[@id='models-table']//tr[td='{made[0]}']//button[.='%s']"
    browser.find_element(By.XPATH, publish % "Publish").click()
    wait(browser, lambda d: d.find_elements(By.XPATH, publish % "Withdraw"))
    browser.find_element(By.XPATH, publish % "Withdraw").click()
    wait(browser, lambda d: d.find_elements(By.XPATH, publish % "Publish"))
    # delete the model: gone from both tables (its alias goes with it)
    browser.find_element(
        By.XPATH, f"//table[@id='models-table']//tr[td='{made[0]}']//button[.='Delete']"
    ).click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: all(r[0] != made[0] for r in rows(d, "models-table")))
    assert [r[0] for r in rows(browser, "aliases-table")] == ["base-bot"]


def test_a_non_admin_sees_no_admin_controls(stack, browser):
    log_in(browser, stack.base_url, stack.user_key)
    assert by_id(browser, "who").text == "signed in"
    assert not browser.find_element(By.CSS_SELECTOR, "#nav a[data-page=keys]").is_displayed()
    visit(browser, stack.base_url, "models")
    wait(browser, lambda d: rows(d, "models-table"))
    assert all("Load" not in r and "Unload" not in r for r in rows(browser, "models-table"))
    browser.get(f"{stack.base_url}/console#keys")
    wait(browser, lambda d: by_id(d, "playground").is_displayed())  # sent back
    assert not by_id(browser, "keys").is_displayed()
    refused = httpx.get(
        f"{stack.base_url}/admin/keys", timeout=30, headers={"Authorization": f"Bearer {stack.user_key}"}
    )
    assert refused.status_code == 403  # and the server refuses it anyway


def test_the_page_ships_its_assets_and_a_strict_policy(stack):
    page = httpx.get(f"{stack.base_url}/console", timeout=30)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text.replace(stack.base_url, "") and "https://" not in page.text
    for asset in ("console.js", "console.css", "vendor/uPlot.iife.min.js", "favicon.svg"):
        assert httpx.get(f"{stack.base_url}/console/static/{asset}", timeout=30).status_code == 200
    assert httpx.get(f"{stack.base_url}/console/static/../__init__.py", timeout=30).status_code == 404


def test_without_authentication_a_newcomer_goes_straight_in(server, browser):
    """The session's plain ``cyllm serve`` (no authentication): no login page, a warning."""
    browser.get("about:blank")
    browser.get(f"{server.base_url}/console")
    wait(browser, lambda d: by_id(d, "playground").is_displayed())
    assert by_id(browser, "who").text == "authentication off"
    assert not by_id(browser, "logout").is_displayed()
    visit(browser, server.base_url, "keys")  # the machine's own user on loopback is its admin
    assert by_id(browser, "keys-auth-off").is_displayed()


def test_a_failed_message_is_a_banner_and_a_conversation_survives_a_reload(stack, browser):
    log_in(browser, stack.base_url, stack.admin_key)
    by_id(browser, "chat-reset").click()
    temperature = by_id(browser, "pg-temperature")
    assert temperature.get_attribute("value") == ""  # the model's own default unless set
    temperature.send_keys("5")  # over the API's limit: the server refuses it
    by_id(browser, "chat-input").send_keys("Hello there")
    by_id(browser, "chat-send").click()
    wait(browser, lambda d: by_id(d, "chat-error").is_displayed())
    assert "temperature" in by_id(browser, "chat-error-text").text
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == []  # the turn is dropped
    temperature.clear()
    temperature.send_keys("0")
    by_id(browser, "chat-retry").click()
    wait(browser, lambda d: "TTFT" in by_id(d, "chat-stats").text, timeout=60)
    assert not by_id(browser, "chat-error").is_displayed()
    # A conversation with code in it, as the tab keeps it: after a reload, still there,
    # the code a block of its own with a Copy button, and markup shown as text.
    browser.execute_script(
        "sessionStorage.setItem('cyllm.chats', JSON.stringify({current: 'a', chats: ["
        "{id: 'a', messages: [{role: 'user', content: 'Code?'},"
        "{role: 'assistant', content: 'Here:\\n```python\\nprint(1)\\n```\\n<b>bold?</b>'}]},"
        "{id: 'b', messages: [{role: 'user', content: 'An older question'},"
        "{role: 'assistant', content: 'An older answer'}]}]}))"
    )
    browser.refresh()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .code pre"))
    assert by_id(browser, "chat-log").find_element(By.CSS_SELECTOR, ".code pre").text == "print(1)"
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .code button")
    assert "<b>bold?</b>" in by_id(browser, "chat-log").text
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log b") == []
    # The history list: each conversation by its first question; one chosen, shown.
    history = Select(by_id(browser, "chat-history"))
    assert [o.text for o in history.options] == ["Code?", "An older question"]
    history.select_by_visible_text("An older question")
    wait(browser, lambda d: "An older answer" in by_id(d, "chat-log").text)
    by_id(browser, "chat-reset").click()  # a new one, first in the list
    assert Select(by_id(browser, "chat-history")).options[0].text == "New conversation"
    by_id(browser, "chat-delete").click()
    assert len(Select(by_id(browser, "chat-history")).options) == 2


def test_every_page_fits_a_phone(stack, browser):
    log_in(browser, stack.base_url, stack.admin_key)
    browser.set_window_size(390, 844)
    try:
        for page in ("playground", "models", "cluster", "training", "keys", "usage"):
            visit(browser, stack.base_url, page)
            wait(browser, lambda d: d.execute_script("return document.readyState") == "complete")
            wide = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 1, (page, wide)  # a wide table scrolls inside itself, not the page
            shoot(browser, f"{page}-390")
    finally:
        browser.set_window_size(1400, 1000)
