"""End to end in a real headless Chromium: rank two prompts through the page (keys, clicks, drag), check the file.

Needs Debian's chromium and Playwright for Python (`make install-browser`); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from lora_rlhf.labeling import LabelSession
from lora_rlhf.labeling.server import LabelServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright missing: run `make install-browser`")
if not shutil.which(CHROMIUM):
    pytest.skip(f"{CHROMIUM} missing: run `make install-browser` (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
def server(tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Say something #{i}", "responses": [f"answer {i}.{j}" for j in range(3)]}
            for i in range(3)]
    rows[1]["prompt"] = [{"role": "user", "content": "<b>not bold</b> please"}]  # shown as text, never as HTML
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    srv = LabelServer(LabelSession.open(tmp_path / "c.jsonl", tmp_path / "r.jsonl"), "127.0.0.1", 0,
                      default_labeler="alice")
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.set_default_timeout(10_000)
        yield pg
        browser.close()
        assert errors == []  # no JavaScript errors along the way


def test_rank_two_prompts_in_the_browser(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server.url)
    expect(page.locator("#item-id")).to_contain_text("p0")
    expect(page.locator("#progress")).to_have_text("0 of 3 done")

    # Prompt 1 by keyboard: response 2 best, then 1 tied with 3 ('=' ties the next pick); flag response 3.
    for key in ("2", "1", "=", "3"):
        page.keyboard.press(key)
    page.locator('.response[data-index="2"] [data-flag="harmful"]').click()
    expect(page.locator('.response[data-index="2"] .place')).to_have_text("#2=")
    page.keyboard.press("Enter")
    expect(page.locator("#item-id")).to_contain_text("p1")
    expect(page.locator("#progress")).to_have_text("1 of 3 done")
    expect(page.locator("#prompt")).to_contain_text("<b>not bold</b> please")

    # Prompt 2 by mouse: click 3, 1, 2 (best first), then drag response 2 from the bottom to the top.
    for idx in (2, 0, 1):
        page.locator(f'.response[data-index="{idx}"] .text').click()
    expect(page.locator("#submit")).to_be_enabled()
    page.locator("#order li").nth(2).drag_to(page.locator("#order li").nth(0))
    expect(page.locator("#order li").nth(0)).to_contain_text("response 2")
    page.locator("#submit").click()
    expect(page.locator("#progress")).to_have_text("2 of 3 done")

    # Reloading resumes at the third prompt: nothing labelled is shown again.
    page.reload()
    expect(page.locator("#item-id")).to_contain_text("p2")

    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(x["id"], x["ranks"], x["flags"], x["labeler"]) for x in lines] == [
        ("p0", [2, 1, 2], {"2": ["harmful"]}, "alice"),   # '2 1=3'
        ("p1", [3, 1, 2], {}, "alice"),                   # clicked 3 1 2, dragged 2 to the top: 2 3 1
    ]
