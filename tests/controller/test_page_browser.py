"""The operators' web page in a real browser: Playwright driving the system's chromium against a
controller (with an API token), a real nats-server and two instances (a stand-in instance
process and an in-process engine with its worker).

Chromium comes from the OS (``make test`` installs Debian's with apt-get when it is missing;
Playwright's own browser download is not used). The test is skipped, saying why, only when no
chromium executable can be found. It leaves a screenshot of the page at ``docs/page-latest.png``
(``make screenshot`` refreshes the committed ``docs/page.png`` the README shows).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support import PROMPT, REPO, WAIT, ControllerRunner, InstanceProcess, controller_settings, stop_process, wait_for

pytestmark = pytest.mark.timeout(300)

TOKEN = "page-browser-s3cret"
#: what instance B stores once the page is open: 3 chunks of 4 tokens
LATER = [101, 202, 303, 404, 505, 606, 707, 808, 909, 1001, 1102, 1203]
#: where the screenshot goes (``LMCACHE_PAGE_SCREENSHOT`` overrides: ``make screenshot``)
SCREENSHOT = Path(os.environ.get("LMCACHE_PAGE_SCREENSHOT", REPO / "docs" / "page-latest.png"))
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def find_chromium() -> str | None:
    """A chromium executable: ``$LMCACHE_CHROMIUM``, or chromium / chromium-browser / google-chrome on PATH."""
    given = os.environ.get("LMCACHE_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "no chromium executable found (looked at $LMCACHE_CHROMIUM, then chromium, chromium-browser and "
            "google-chrome on PATH); `make test` installs Debian's chromium with apt-get"
        )
    return path


@pytest.fixture
def browser(chromium: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]'", pytrace=False)
    # chromium refuses to sandbox itself as root (the test machines run as root)
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[*args, "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def api_counts(api: httpx.Client) -> dict[tuple[str, str], tuple[int, int]]:
    """(chunks, tokens) per (instance, location) of rank 0, as ``/instances`` reports them."""
    body = api.get("/instances").json()
    return {
        (inst["instance_id"], name): (loc["chunks"], loc["tokens"])
        for inst in body["instances"]
        for name, loc in inst["workers"][0]["locations"].items()
    }


def result_json(text: str) -> tuple[int, Any]:
    """A result box of the page: the status line, then the JSON answer."""
    status, _, body = text.partition("\n")
    return int(status), json.loads(body)


def test_the_page_shows_the_fleet_live_and_acts_on_it(nats_url: str, tmp_path: Path, make_instance, browser) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT * 1000)
    with ControllerRunner(nats_url, controller_settings(controller_api_token=TOKEN)) as controller:
        a = InstanceProcess(nats_url, tmp_path / "a", instance_id="inst-a")  # stores the 12-token prompt
        b = make_instance("inst-b")
        api = httpx.Client(base_url=controller.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        try:
            b.store(LATER[:8])  # 2 chunks
            b.sync()
            wait_for(lambda: len(api_counts(api)) == 4, what="both instances in the index")
            before = api_counts(api)
            assert before[("inst-a", CPU)] == (1, 12) and before[("inst-b", CPU)] == (2, 8)

            page = browser.new_page(viewport={"width": 1400, "height": 1050})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(controller.url + "/")
            # the controller has a token: the page asks for it, then goes live
            expect(page.locator("#status")).to_have_text("token needed")
            page.fill("#token-input", TOKEN)
            page.click("#token-form button[type=submit]")
            expect(page.locator("#status")).to_have_text("live")

            # both instances, every location, with the index's counts
            for (instance, location), (chunks, tokens) in before.items():
                row = page.locator(f'#instances tr[data-instance="{instance}"][data-location="{location}"]')
                expect(row.locator(".chunks")).to_have_text(str(chunks))
                expect(row.locator(".tokens")).to_have_text(str(tokens))
                # bytes used of the capacity, from the heartbeats: "6.0 KiB of 51.2 MiB (0.0%)"
                expect(row.locator(".capacity")).to_have_text(re.compile(r"\S+ \S*B of [\d.]+ \S*B \([\d.]+%\)"))
            expect(page.locator("#totals")).to_contain_text("2 instances")

            # a store shows up live in the feed (a new event id, no reload) and in the table
            shown = page.locator("#feed li").evaluate_all("items => items.map(li => Number(li.dataset.id))")
            b.store(LATER)  # 3 chunks: the first 2 are held already, 1 is new in each location
            b.sync()
            stored = page.locator("#feed li[data-kind=stored]", has_text=f"inst-b stored 1 chunk (4 tokens) at {CPU}")
            expect(stored).to_be_visible()
            assert int(stored.get_attribute("data-id")) > max(shown, default=0)
            b_cpu = page.locator(f'#instances tr[data-instance="inst-b"][data-location="{CPU}"]')
            expect(b_cpu.locator(".chunks")).to_have_text("3")
            expect(b_cpu.locator(".tokens")).to_have_text("12")

            # a lookup from the page: token ids separated by commas and spaces, the API's answer
            page.fill("#lookup-tokens", ", ".join(map(str, LATER[:6])) + " " + " ".join(map(str, LATER[6:])))
            page.click("#lookup-form button[type=submit]")
            expect(page.locator("#lookup-result")).to_contain_text("layout_info")
            status, answer = result_json(page.locator("#lookup-result").text_content())
            assert status == 200
            assert answer["layout_info"] == {"inst-b": [CPU, 12]}
            assert answer["layout_info"] == api.post("/lookup", json={"tokens": LATER}).json()["layout_info"]

            # clear, cancelled: nothing happens
            page.select_option("#action-instance", "inst-a")
            page.select_option("#action-location", CPU)
            page.click("#action-form button[data-action=clear]")
            expect(page.locator("#confirm")).to_be_visible()
            expect(page.locator("#confirm-text")).to_contain_text(f"Clear everything at {CPU} on every rank of inst-a")
            page.click("#confirm-cancel")
            expect(page.locator("#action-result")).to_have_text("clear cancelled")
            assert api_counts(api)[("inst-a", CPU)] == (1, 12)

            # clear, confirmed: the API's answer on the page, the index and the feed follow
            page.click("#action-form button[data-action=clear]")
            page.click("#confirm-ok")
            expect(page.locator("#action-result")).to_contain_text("num_tokens")
            status, answer = result_json(page.locator("#action-result").text_content())
            assert status == 200 and answer["num_tokens"] == 12
            after = api_counts(api)
            assert after[("inst-a", CPU)] == (0, 0) and after[("inst-a", DISK)] == before[("inst-a", DISK)]
            assert api.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"] == {"inst-a": [DISK, 12]}
            expect(page.locator("#feed li[data-kind=cleared]", has_text=f"inst-a/0 cleared {CPU} (12 tokens)")).to_be_visible()
            a_cpu = page.locator(f'#instances tr[data-instance="inst-a"][data-location="{CPU}"]')
            expect(a_cpu.locator(".chunks")).to_have_text("0")

            # pin: the page sends the API's body and shows whatever JSON the API answers
            page.fill("#action-tokens", " ".join(map(str, LATER)))
            page.select_option("#action-instance", "inst-b")
            page.select_option("#action-location", CPU)
            page.click("#action-form button[data-action=pin]")
            expect(page.locator("#confirm-body")).to_contain_text('"tokens"')
            page.click("#confirm-ok")
            expect(page.locator("#action-result")).not_to_have_text("…")
            expect(page.locator("#action-result")).not_to_have_text("")
            status, answer = result_json(page.locator("#action-result").text_content())
            direct = api.post("/pin", json={"instance_id": "inst-b", "location": CPU, "tokens": LATER})
            assert status == direct.status_code
            if status >= 400:
                assert answer == direct.json()  # e.g. 404 {"detail": "Not Found"} before /pin exists

            # lookups over several seconds, a share of them hits that changes each second: the
            # charts draw them; then the screenshot
            def traffic() -> bool:
                share = 1 + int(time.monotonic()) % 4  # of 4 lookups, this many find something
                for i in range(4):
                    api.post("/lookup", json={"tokens": LATER if i < share else [7] * 12})
                return sum(1 for n in api.get("/page/summary").json()["activity"]["lookups"] if n) >= 8

            wait_for(traffic, what="8 seconds with lookups")
            expect(page.locator("#routes")).to_contain_text("/lookup")
            expect(page.locator("#chart-hits polyline, #chart-hits circle").first).to_be_attached()
            page.fill("#lookup-tokens", " ".join(map(str, LATER)))
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert errors == [], errors
        finally:
            api.close()
            stop_process(a.proc)
