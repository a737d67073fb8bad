"""The dashboard in headless Chromium against a real sidecar and a real agent.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` package;
skipped with the reason when any is missing. Selenium blocks, so every call goes through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from sidecar.client import open_agent
from tests.helpers import make_config, publish_many, running_sidecar, until

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - depends on the environment
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = (
    "/usr/bin/chromedriver"
    if Path("/usr/bin/chromedriver").exists()
    else shutil.which("chromedriver")
)
EMPTY = "\u2013"  # what the page shows before it has a value
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(
        webdriver is None, reason="selenium is not installed (pip install selenium)"
    ),
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium not found (Debian: apt-get install chromium)"
    ),
    pytest.mark.skipif(
        CHROMEDRIVER is None,
        reason="chromedriver not found (Debian: apt-get install chromium-driver)",
    ),
]

T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def start_browser(profile: Path) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    return driver


class Page:
    """Blocking reads of the dashboard, for use through ``blocking``."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text

    def attr(self, element_id: str, name: str) -> str | None:
        return self.driver.find_element(By.ID, element_id).get_attribute(name)

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def queue_row(self, queue: str) -> dict[str, str] | None:
        """The queue's row, read in one script (the page rebuilds rows on every push)."""
        return self.driver.execute_script(
            """
            const row = [...document.querySelectorAll('#queue-depths tr')]
                .find((tr) => tr.dataset.queue === arguments[0]);
            if (!row) return null;
            const cell = (cls) => row.querySelector(cls).textContent;
            return {depth: cell('.depth'), level: cell('.level'), consumers: cell('.consumers')};
            """,
            queue,
        )

    def filled(self, queue: str) -> bool:
        return (
            self.attr("dlq-health", "data-filled") == "true"
            and self.attr("backpressure-status", "data-filled") == "true"
            and self.queue_row(queue) is not None
            and self.text("acked") != EMPTY
        )


async def test_dashboard_renders_both_views_and_updates_live(tmp_path, unique_queue):
    queue = unique_queue("dash")
    config = make_config(tmp_path, [queue])
    driver = None
    try:
        with trio.fail_after(90):
            async with running_sidecar(config) as sidecar:
                driver = await blocking(start_browser, tmp_path / "chromium-profile")
                page = Page(driver)
                await blocking(driver.get, f"http://127.0.0.1:{sidecar.http_port}/")
                assert "sidecar" in await blocking(lambda: driver.title)

                async with open_agent(config.agent.socket, agent="viewer", queues=[queue]) as agent:
                    # Both seed views filled from the live socket.
                    await until(lambda: blocking(page.filled, queue), 0.1)
                    assert await blocking(page.text, "conn-state") == "live"
                    assert await blocking(page.text, "dlq-size") == "0"
                    assert await blocking(page.text, "acked") == "0"
                    assert await blocking(page.text, "system-pressure") == "NORMAL"
                    assert re.fullmatch(r"\d+%", await blocking(page.text, "cpu-pct"))
                    assert re.fullmatch(r"\d+%", await blocking(page.text, "memory-pct"))
                    assert await blocking(page.text, "breaker-state") == "CLOSED"
                    assert await blocking(page.queue_row, queue) == {
                        "depth": "0",
                        "level": "normal",
                        "consumers": "1",
                    }
                    # Mark the window: a reload would lose it.
                    await blocking(page.js, "window.__noReload = 42;")

                    await publish_many(queue, [b"good-%d" % i for i in range(5)] + [b"bad"])
                    handled = 0
                    while handled < 6:
                        for m in await agent.pull(6, wait=0.5):
                            if m.body == b"bad":
                                await agent.fail(m.id, "VALIDATION_FAILED", "missing field url")
                            else:
                                await agent.ack([m.id])
                            handled += 1

                    await until(lambda: _equals(page, "acked", "5"), 0.1)
                    await until(lambda: _equals(page, "dlq-size", "1"), 0.1)
                    assert await blocking(page.js, "return window.__noReload;") == 42
                    assert await blocking(page.text, "delivered") == "6"
                    assert await blocking(page.text, "dead-lettered") == "1"
                    assert await blocking(page.text, "retried") == "0"
                    top = await blocking(page.text, "top-failures")
                    assert "VALIDATION_FAILED (1)" in top
                    newest = await blocking(page.text, "dlq-newest")
                    assert newest == "just now" or newest.endswith("ago"), newest
                    assert await blocking(page.text, "dlq-oldest") != EMPTY
                    await until(lambda: _contains(page, "alerts", "NEW_DLQ_PATTERN"), 0.1)

                    # Drop the socket: the page reconnects by itself and keeps updating.
                    updates = int(await blocking(page.js, "return document.body.dataset.updates;"))
                    await blocking(page.js, "window.sidecarDashboard.socket().close();")
                    await until(
                        lambda: blocking(
                            page.js,
                            f"return Number(document.body.dataset.updates) > {updates + 1};",
                        ),
                        0.1,
                    )
                    assert await blocking(page.text, "conn-state") == "live"

                    # A few history points for the chart, then the picture.
                    await until(
                        lambda: blocking(
                            page.js,
                            "return Number(document.getElementById('history-chart')"
                            ".dataset.points) >= 3;",
                        ),
                        0.2,
                    )
                    png = await blocking(driver.get_screenshot_as_png)
    finally:
        if driver is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(15):
                await blocking(driver.quit)
    assert png.startswith(b"\x89PNG")
    (tmp_path / "dashboard.png").write_bytes(png)
    artifacts = REPO_ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "dashboard.png").write_bytes(png)


async def _equals(page: Page, element_id: str, value: str) -> bool:
    return await blocking(page.text, element_id) == value


async def _contains(page: Page, element_id: str, value: str) -> bool:
    return value in await blocking(page.text, element_id)
