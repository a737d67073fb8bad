"""``sidecar status`` against a running daemon: found from the config, HOST:PORT or a URL,
and showing breaker, sessions, broker, pressure, depth level and spool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from sidecar.client import open_agent
from tests.helpers import make_config, publish_many, running_sidecar, until
from tests.observability._http import get_json

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = "import sys; from sidecar.cli import main; sys.exit(main(sys.argv[1:]))"


async def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", CLI, "status", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )

    return await trio.to_thread.run_sync(run)


async def test_status_finds_the_daemon_and_shows_the_breaker(tmp_path, unique_queue):
    queue = unique_queue("obs")
    await publish_many(queue, [b'{"n": %d}' % i for i in range(6)])
    config = make_config(
        tmp_path,
        [queue],
        breaker={"failure_threshold": 2, "open_timeout": 300.0, "max_open_timeout": 600.0},
    )
    with trio.fail_after(90):
        async with running_sidecar(config) as sidecar:
            port = sidecar.http_port
            config_file = tmp_path / "sidecar.toml"
            config_file.write_text(f'[http]\nlisten = "0.0.0.0:{port}"\n')
            async with open_agent(
                config.agent.socket, agent="checker", version="4.5.6", queues=[queue]
            ) as agent:
                failed = 0
                while failed < 2:
                    for m in await agent.pull(1, wait=0.5):
                        await agent.fail(m.id, "NETWORK_ERROR", "connection reset")
                        failed += 1
                await until(lambda: _breaker_is(port, "OPEN"))

                out = await status_cli("--config", str(config_file))
                assert out.returncode == 0, out.stderr
                text = out.stdout
                assert f"127.0.0.1:{port}" in text
                assert "Breaker: OPEN since " in text and "next probe at " in text
                assert "Broker: connected" in text and "not blocked" in text
                assert "checker" in text and "4.5.6" in text
                assert "Pressure: " in text and "Depth level: " in text and "Spool: 0" in text
                assert "Memory: {" not in text

                for address in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}/"):
                    out = await status_cli("--http", address, "--json")
                    assert out.returncode == 0, (address, out.stderr)
                    summary = json.loads(out.stdout)["summary"]
                    assert summary["breaker"]["state"] == "OPEN"
                    assert 0 < summary["breaker"]["next_probe_in"] <= 300
                    assert summary["breaker"]["since"].endswith("Z")
                    assert summary["broker"]["connected"] is True
                    assert summary["broker"]["blocked"] is False
                    assert summary["broker"]["generation"] >= 1
                    assert [(s["agent"], s["version"]) for s in summary["sessions"]] == [
                        ("checker", "4.5.6")
                    ]
                    assert summary["spool"]["records"] == 0
                    assert summary["depth_level"] in ("normal", "warning", "critical", "emergency")
                    assert summary["pressure"]["level"]


async def test_status_address_errors_are_one_line() -> None:
    with trio.fail_after(60):
        out = await status_cli("--http", "127.0.0.1:1")
        assert out.returncode == 5
        assert out.stderr.count("\n") == 1 and "cannot reach sidecar" in out.stderr
        out = await status_cli("--http", "ftp://example")
        assert out.returncode == 2
        assert "expected HOST:PORT or an http:// URL" in out.stderr
        out = await status_cli("--http", "nonsense")
        assert out.returncode == 2


async def _breaker_is(port: int, state: str) -> bool:
    return (await get_json(port, "/status"))["summary"]["breaker"]["state"] == state
