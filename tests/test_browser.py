"""The web page in a real browser: Debian's headless chromium driven by Playwright.

Playwright's own browser download needs the network, so the test launches the system chromium
(``executable_path``) against a uvicorn server on a free loopback port, running the service over
the two tiny indexes of tests/helpers.py. It asks a question, waits for the answer, checks the
provenance the page shows (passages, bars, tokens coloured by passage, the index that answered),
switches the index as an admin and sees the provenance follow; it saves a screenshot.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

from helpers import ADMIN_TOKEN as TOKEN
from helpers import SERVER_QUESTIONS as QUESTIONS
from helpers import SERVER_TOP as TOP
from helpers import build_world, make_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt install chromium)",
)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, bart):
    """The service on 127.0.0.1:<free port>, served by uvicorn in a thread."""
    import uvicorn

    app = make_app(build_world(tmp_path_factory.mktemp("indexes"), bart))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def page(server_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def expect(locator):
    """Playwright's auto-waiting assertions (no page-side eval: the page's CSP forbids it)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def ask(page, question: str) -> list[str]:
    """Type a question, press Ask, wait for the provenance; the passage titles shown."""
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_selector("#passages li.passage")
    expect(page.locator("#status")).to_have_text("Done.")
    return page.locator("#passages li .title").all_inner_texts()


def test_the_page_answers_with_provenance_and_follows_a_hot_swap(page, server_url, tmp_path):
    page.goto(server_url + "/")
    expect(page.locator("#index-id")).to_have_text("2016")
    version = page.inner_text("#index-version")
    assert len(version) == 16

    titles = ask(page, QUESTIONS[0])
    assert titles[0] == TOP["2016"][0] and len(titles) == 5  # the page's k
    assert page.inner_text("#answer").strip() != ""
    assert page.inner_text("#answer-index") == f"2016@{version}"
    # prior and posterior bars: the best passage's prior is its softmax share, drawn as width
    priors = [float(v) for v in page.locator(".prior .fill").evaluate_all(
        "els => els.map(e => e.dataset.value)")]
    assert sum(priors) == pytest.approx(1.0, abs=1e-4) and priors[0] == max(priors)
    assert page.locator(".posterior .fill").count() == 5
    # RAG-Token: the answer's tokens, each coloured by the passage that supported it
    tokens = page.locator("#tokens .token")
    assert tokens.count() >= 1
    for i in range(tokens.count()):
        passage = int(tokens.nth(i).get_attribute("data-passage"))
        assert 0 <= passage < 5
        assert f"c{passage}" in tokens.nth(i).get_attribute("class")
    page.screenshot(path=str(tmp_path / "margin-2016.png"), full_page=True)
    assert (tmp_path / "margin-2016.png").stat().st_size > 10_000

    # a wrong admin token is refused and nothing changes
    page.click("#admin summary")
    page.fill("#admin-token", "wrong")
    page.select_option("#index-select", "2018")
    page.click("#switch")
    expect(page.locator("#admin-status")).to_have_text(re.compile(r"^refused: wrong admin token"))
    assert page.inner_text("#index-id") == "2016"

    # the right token switches; the same question now retrieves the 2018 fact
    page.fill("#admin-token", TOKEN)
    page.select_option("#index-select", "2018")
    page.click("#switch")
    expect(page.locator("#index-id")).to_have_text("2018")
    titles = ask(page, QUESTIONS[0])
    assert titles[0] == TOP["2018"][0]
    assert page.inner_text("#answer-index").startswith("2018@")
    page.screenshot(path=str(tmp_path / "margin-2018.png"), full_page=True)


def test_the_page_shows_a_bad_request_as_an_error(page, server_url):
    page.goto(server_url + "/")
    page.fill("#k", "7")  # within the form's 1-20, but the index holds only 6 passages
    page.fill("#question", "capital of france?")
    page.click("#ask")
    expect(page.locator("#error")).to_have_text(re.compile(r"^k: 7 is out of range"))
