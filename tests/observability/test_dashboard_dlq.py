"""Browsing and acting on dead letters from the dashboard, in headless Chromium against a
real sidecar and the real broker."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.helpers import make_config, queue_count, running_sidecar, until
from tests.observability.test_dashboard_browser import (
    CHROMEDRIVER,
    CHROMIUM,
    REPO_ROOT,
    Page,
    blocking,
    start_browser,
    webdriver,
)
from tests.observability.test_dlq_api import TOKEN, declare, drain, records

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not found (apt-get install chromium)"),
    pytest.mark.skipif(
        CHROMEDRIVER is None, reason="chromedriver not found (apt-get install chromium-driver)"
    ),
]

ROWS = "return [...document.querySelectorAll('#dlq-rows tr')].map((tr) => tr.dataset.id || null);"


class DlqPage(Page):
    def rows(self) -> list[str | None]:
        result: list[str | None] = self.js(ROWS)
        return result

    def loads(self) -> int:
        return int(
            self.js("return Number(document.getElementById('dlq-browser').dataset.loaded || 0);")
        )

    def results(self) -> int:
        return int(self.js("return Number(document.getElementById('d-result').dataset.done || 0);"))

    def set_value(self, element_id: str, value: str, event: str) -> None:
        self.js(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event(arguments[2], {bubbles: true}));",
            element_id,
            value,
            event,
        )

    def click(self, selector: str) -> None:
        self.js("document.querySelector(arguments[0]).click();", selector)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)


async def wait_rows(page: DlqPage, expected: set[str]) -> None:
    async def check() -> bool:
        return set(await blocking(page.rows)) == expected

    await until(check, 0.1)


async def act(page: DlqPage, button: str) -> str:
    before = await blocking(page.results)
    await blocking(page.click, button)

    async def done() -> bool:
        return await blocking(page.results) > before

    await until(done, 0.1)
    return await blocking(page.text, "d-result")


async def test_browse_filter_open_retry_and_move(tmp_path, unique_queue):
    queue, other = unique_queue("dash"), unique_queue("dash")
    await declare(queue, other)
    config = make_config(tmp_path, [], http={"listen": "127.0.0.1:0", "admin_token": TOKEN})
    driver = None
    try:
        with trio.fail_after(120):
            async with running_sidecar(config) as sidecar:
                for r in records(queue):
                    sidecar.store.put(r)
                driver = await blocking(start_browser, tmp_path / "chromium-profile")
                page = DlqPage(driver)
                await blocking(driver.get, f"http://127.0.0.1:{sidecar.http_port}/")
                await wait_rows(page, {"v-1", "v-2", "t-1"})
                assert "1\u20133 of 3" in await blocking(page.text, "dlq-count")

                # Filter by reason (the select lists the reasons present), then by pattern.
                await blocking(page.set_value, "f-reason", "VALIDATION_FAILED", "change")
                await wait_rows(page, {"v-1", "v-2"})
                await blocking(page.set_value, "f-reason", "", "change")
                await blocking(page.set_value, "f-pattern", "TIMED OUT", "input")
                await blocking(page.click, "#f-apply")
                await wait_rows(page, {"t-1"})
                await blocking(page.set_value, "f-pattern", "", "input")
                await blocking(page.set_value, "f-queue", queue, "input")
                await blocking(page.click, "#f-apply")
                await wait_rows(page, {"v-1", "v-2", "t-1"})

                # Open a record: JSON body as JSON, binary as hex, failures listed.
                await blocking(page.click, "#dlq-rows tr[data-id='v-1']")
                await until(lambda: _attr(page, "dlq-detail", "data-id", "v-1"), 0.1)
                body = await blocking(page.text, "d-body")
                assert '"jobId": "v-1"' in body
                assert await blocking(page.attr, "d-body", "data-kind") == "json"
                assert "missing field url" in await blocking(page.text, "d-fields")
                await blocking(page.click, "#dlq-rows tr[data-id='t-1']")
                await until(lambda: _attr(page, "dlq-detail", "data-id", "t-1"), 0.1)
                assert await blocking(page.text, "d-body") == "ff 00 62 69 6e 61 72 79"
                await blocking(page.click, "#dlq-rows tr[data-id='v-1']")
                await until(lambda: _attr(page, "dlq-detail", "data-id", "v-1"), 0.1)

                # A wrong token changes nothing.
                await blocking(page.set_value, "admin-token", "wrong", "input")
                assert "valid admin token" in await act(page, "#d-retry")
                assert not sidecar.store.get("v-1").reprocessed
                assert await queue_count(queue) == 0

                # The right one retries to the original queue, once.
                await blocking(page.set_value, "admin-token", TOKEN, "input")
                assert f"retried v-1 to {queue}" in await act(page, "#d-retry")
                assert len(await drain(queue)) == 1
                assert sidecar.store.get("v-1").reprocessed
                assert "dashboard retry" in await blocking(page.text, "d-history")
                assert "already reprocessed" in await act(page, "#d-retry")
                assert await queue_count(queue) == 0

                # Move another one to a chosen queue.
                await blocking(page.click, "#dlq-rows tr[data-id='v-2']")
                await until(lambda: _attr(page, "dlq-detail", "data-id", "v-2"), 0.1)
                await blocking(page.set_value, "d-target", other, "input")
                assert f"moved v-2 to {other}" in await act(page, "#d-move")
                assert len(await drain(other)) == 1
                assert sidecar.store.get("v-2").reprocessTarget == other

                async def reprocessed_column() -> bool:
                    cells = await blocking(
                        page.js,
                        "return [...document.querySelectorAll('#dlq-rows tr')]"
                        ".map((tr) => [tr.dataset.id, tr.querySelector('.reprocessed')"
                        ".textContent]);",
                    )
                    return dict(cells) == {"v-1": "yes", "v-2": "yes", "t-1": "no"}

                await until(reprocessed_column, 0.1)
                await blocking(page.js, "document.getElementById('dlq-browser').scrollIntoView();")
                png = await blocking(driver.get_screenshot_as_png)
    finally:
        if driver is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(15):
                await blocking(driver.quit)
    assert png.startswith(b"\x89PNG")
    artifacts = REPO_ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "dashboard-dead-letters.png").write_bytes(png)


async def _attr(page: Page, element_id: str, name: str, value: str) -> bool:
    return await blocking(page.attr, element_id, name) == value
