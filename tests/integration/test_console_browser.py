"""The web console in a real headless Chromium, over the session fleet.

The fleet page shows a server that the test starts and then kills (a stub OpenAI server in a
process of its own, registered with the controller as an external server, as a team adds a
`vllm serve` it runs itself): READY, then FAILED once the controller's probe finds it dead.
The playground streams an answer from a real vLLM engine, and its Stop button aborts one.

With VPOOL_SCREENSHOTS_DIR set, the tests save console-fleet.png and console-playground.png
there (the README's screenshots: `VPOOL_SCREENSHOTS_DIR=docs pytest` on this file).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import API_KEY, TOKEN, Fleet
from tests.support import browser
from tests.support.processes import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or ""),
]

ROOT = Path(__file__).resolve().parents[2]
KEY_ITEM = "vpool.apiKey"  # where the page keeps the key (sessionStorage)
PAGE_TIMEOUT_S = 30  # the page polls every 2 s; the controller probes external servers every 1 s
ENGINE_TIMEOUT_S = 180  # two CPU cores shared by six engines


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with browser.chromium() as chromium:
        yield chromium


def _screenshot(driver: Any, name: str) -> None:
    folder = os.environ.get("VPOOL_SCREENSHOTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def _wait(driver: Any, what: str, condition: Callable[[Any], Any], timeout_s: float = PAGE_TIMEOUT_S) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws its tables on every refresh: an element read mid-redraw is stale.
    ignored = (StaleElementReferenceException,)
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1, ignored_exceptions=ignored).until(
            condition
        )
    except TimeoutException:
        pytest.fail(
            f"timed out after {timeout_s} s waiting for {what}\npage log:\n{browser.page_log(driver)}"
        )


def _by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _give_key(driver: Any, key: str) -> None:
    field = _by_id(driver, "key-input")
    field.clear()
    field.send_keys(key)
    _css(driver, "#key-form button[type=submit]")[0].click()


def _open(driver: Any, fleet: Fleet, page: str) -> None:
    """The console at `page`, with the key given in its form if this tab has none yet."""
    driver.get(f"{fleet.gateway_url}/ui/#{page}")
    if not driver.execute_script(f"return sessionStorage.getItem('{KEY_ITEM}')"):
        _wait(driver, "the page to ask for the key", lambda d: _by_id(d, "key-panel").is_displayed())
        _give_key(driver, API_KEY)
    _wait(driver, "the key form to close", lambda d: not _by_id(d, "key-panel").is_displayed())


def _worker_state(driver: Any, worker_id: str) -> str | None:
    # One script, so the page cannot redraw the table between finding the row and reading it.
    return driver.execute_script(  # type: ignore[no-any-return]
        "const row = document.querySelector(`#workers-body tr[data-worker-id='${arguments[0]}']`);"
        "return row ? row.getAttribute('data-state') : null;",
        worker_id,
    )


def _worker_row_text(driver: Any, worker_id: str) -> str:
    return driver.execute_script(  # type: ignore[no-any-return]
        "const row = document.querySelector(`#workers-body tr[data-worker-id='${arguments[0]}']`);"
        "return row ? row.innerText : '';",
        worker_id,
    )


def _worker_cell(driver: Any, worker_id: str, header: str) -> str | None:
    """The text of a worker's cell under the column headed `header`."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const heads = [...document.querySelectorAll('#workers-table thead th')].map(th => th.innerText);"
        "const row = document.querySelector(`#workers-body tr[data-worker-id='${arguments[0]}']`);"
        "const at = heads.indexOf(arguments[1]);"
        "return row && at >= 0 ? row.cells[at].innerText : null;",
        worker_id,
        header,
    )


@contextlib.contextmanager
def external_server(
    fleet: Fleet, worker_id: str, model: str, *stub_args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A stub OpenAI server in a process of its own, registered as an external server;
    deregistered and killed at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.support.stub_worker", "--port", str(port), "--name", worker_id]
    proc = subprocess.Popen([*command, *stub_args], cwd=ROOT, env=env)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the stub server exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the stub server did not start"
            time.sleep(0.1)
        registration = {"worker_id": worker_id, "url": url, "models": [model], "kind": "external"}
        resp = httpx.post(f"{fleet.controller_url}/v1/workers", json=registration, headers=admin, timeout=10)
        assert resp.status_code == 201, resp.text
        yield proc
    finally:
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{fleet.controller_url}/v1/workers/{worker_id}", headers=admin, timeout=10)
        proc.kill()
        proc.wait(10)


# Records each change of the answer box: (characters shown, its state then). Mutation
# callbacks run once per task, so two growing lengths mean two network reads rendered.
WATCH_OUTPUT = """
window.__seen = [];
const out = document.getElementById("pg-output");
new MutationObserver(() => window.__seen.push([out.textContent.length, out.dataset.state]))
  .observe(out, {childList: true, characterData: true, subtree: true,
                 attributes: true, attributeFilter: ["data-state"]});
"""


def _pick_model(driver: Any, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    last_reload = [time.monotonic()]

    def listed(d: Any) -> bool:
        if _css(d, f"#pg-model option[value='{model}']"):
            return True
        if time.monotonic() - last_reload[0] > 1:  # read when the page opened: read it again
            _by_id(d, "pg-reload").click()
            last_reload[0] = time.monotonic()
        return False

    _wait(driver, f"{model} in the model list", listed)
    Select(_by_id(driver, "pg-model")).select_by_value(model)


def _fill(driver: Any, element_id: str, text: str) -> None:
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


# --- tests -------------------------------------------------------------------------------


def test_fleet_page_asks_for_the_key_and_shows_a_server_come_and_die(driver: Any, fleet: Fleet) -> None:
    driver.get(f"{fleet.gateway_url}/ui/")
    driver.execute_script(f"sessionStorage.removeItem('{KEY_ITEM}')")
    driver.refresh()
    _wait(driver, "the page to ask for the key", lambda d: _by_id(d, "key-panel").is_displayed())
    assert "needs an API key" in _by_id(driver, "key-message").text
    _give_key(driver, "sk-not-this-one")
    _wait(driver, "the refusal", lambda d: "refused this key" in _by_id(d, "key-message").text.lower())
    _give_key(driver, API_KEY)
    _wait(driver, "the fleet's engines", lambda d: _worker_state(d, "tiny-a") == "READY")
    assert _css(driver, "#models-body tr[data-model='tiny-chat']")
    assert not _by_id(driver, "fleet-status").get_attribute("class").endswith("bad")

    with external_server(fleet, "console-demo", "console-demo-model") as server:
        _wait(driver, "the new server READY", lambda d: _worker_state(d, "console-demo") == "READY")
        row = _worker_row_text(driver, "console-demo")
        assert "console-demo-model" in row and "external" in row
        # An external server reports no engine counters: a dash, not a 0 % hit rate.
        assert _worker_cell(driver, "console-demo", "prefix-cache hits") == "\u2014"
        _screenshot(driver, "console-fleet.png")
        server.kill()
        server.wait(10)
        _wait(driver, "the killed server FAILED", lambda d: _worker_state(d, "console-demo") == "FAILED")
    # Deregistered: GONE, then out of the registry's listing.
    _wait(driver, "the server deregistered", lambda d: _worker_state(d, "console-demo") in ("GONE", None))
    assert _worker_state(driver, "tiny-a") == "READY"


def test_playground_streams_an_answer_from_a_real_engine(driver: Any, fleet: Fleet) -> None:
    _open(driver, fleet, "playground")
    _pick_model(driver, "tiny-chat")
    _fill(driver, "pg-system", "You are a terse assistant.")
    _fill(driver, "pg-user", "What does a pool of workers do?")
    _fill(driver, "pg-temperature", "0.8")
    # Enough for the stream to take several reads: 16 tokens on this CPU engine sometimes
    # arrive in one (vLLM merges the deltas of a consumer that lags; measured here: 3 of 15
    # sixteen-token answers rendered in one step, none of 15 ninety-six-token ones).
    _fill(driver, "pg-max-tokens", "96")
    driver.execute_script(WATCH_OUTPUT)

    _by_id(driver, "pg-send").click()
    _wait(
        driver,
        "the answer to end",
        lambda d: _by_id(d, "pg-output").get_attribute("data-state") in ("done", "error", "stopped"),
        ENGINE_TIMEOUT_S,
    )

    status = _by_id(driver, "pg-status").text
    assert _by_id(driver, "pg-output").get_attribute("data-state") == "done", (
        _by_id(driver, "pg-error").text,
        status,
    )
    answer = _by_id(driver, "pg-output").text
    assert answer.strip()
    assert "served by tiny-" in status and "tokens" in status
    seen: list[list[Any]] = driver.execute_script("return window.__seen")
    growing = sorted({length for length, state in seen if state == "streaming" and length > 0})
    assert len(growing) >= 2, f"the answer did not stream in: {seen}"
    assert seen[-1][1] == "done"
    assert _by_id(driver, "pg-send").is_enabled() and not _by_id(driver, "pg-stop").is_enabled()
    _screenshot(driver, "console-playground.png")


def test_playground_stop_aborts_the_stream(driver: Any, fleet: Fleet) -> None:
    # 60 events 0.25 s apart: a quarter of a minute, unless stopped.
    with external_server(
        fleet, "console-slow", "console-slow-model", "--events", "60", "--event-interval-s", "0.25"
    ):
        _open(driver, fleet, "playground")
        _pick_model(driver, "console-slow-model")
        _fill(driver, "pg-user", "Take your time.")
        _by_id(driver, "pg-send").click()
        _wait(driver, "the first tokens", lambda d: len(_by_id(d, "pg-output").text) >= len("tok0 tok1"))
        _by_id(driver, "pg-stop").click()
        _wait(driver, "the stop", lambda d: _by_id(d, "pg-output").get_attribute("data-state") == "stopped")
        shown = _by_id(driver, "pg-output").text
        time.sleep(1)  # nothing more comes
        assert _by_id(driver, "pg-output").text == shown
        assert "tok59" not in shown
        assert _by_id(driver, "pg-send").is_enabled()
