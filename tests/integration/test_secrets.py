"""No secret reaches anything the sidecar prints: a full run's log, /status, /metrics,
/readyz, and the output of every operator tool, with passwords holding @ / : % and
non-ASCII characters (percent-encoded in the URL, as a URL requires)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from sidecar.supervisor import Sidecar
from tests.helpers import make_config, until
from tests.observability._http import http

pytestmark = pytest.mark.integration

BROKER_PASSWORD = "br/ok@er:pw%41-ümlaut"
STORE_PASSWORD = "st@re/pw:9%-ß"
HOOK_PASSWORD = "ho:ok@pw/ö"
TOKEN = "agent-token-Zq81x"
# Written raw, as operators do: the parser takes everything up to the last "@".
RAW_AT_PASSWORD = "2Secret@2Secret"
SECRETS = [BROKER_PASSWORD, STORE_PASSWORD, HOOK_PASSWORD, TOKEN, RAW_AT_PASSWORD]


def forbidden() -> list[str]:
    """Each secret raw and percent-encoded, and its longer pieces (a half-redacted
    password is still a leak)."""
    out: set[str] = set()
    for secret in SECRETS:
        out |= {secret, quote(secret, safe=""), quote(secret)}
        for sep in "@/:%":
            out |= {piece for piece in secret.split(sep) if len(piece) >= 4}
    return sorted(out)


def assert_clean(text: str, where: str) -> None:
    leaks = [s for s in forbidden() if s in text]
    assert not leaks, f"{where} shows {leaks}"


def urls(raw_at: bool = False) -> dict[str, str]:
    password = RAW_AT_PASSWORD if raw_at else quote(BROKER_PASSWORD, safe="")
    return {
        # A real broker with the wrong password: the daemon runs, logs its failures.
        "broker": f"amqp://guest:{password}@127.0.0.1:5672/",
        # No MongoDB here: unavailable, so dead letters would be spooled; errors are logged.
        "store": f"mongodb://admin:{quote(STORE_PASSWORD, safe='')}@127.0.0.1:9/dlq",
        "webhook": f"http://alert:{quote(HOOK_PASSWORD, safe='')}@127.0.0.1:9/hook",
    }


@pytest.mark.parametrize("raw_at", [False, True], ids=["encoded", "raw-at"])
async def test_a_full_run_prints_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, raw_at: bool
) -> None:
    u = urls(raw_at)
    config = make_config(
        tmp_path,
        [],
        broker={"url": u["broker"], "reconnect_min": 0.2, "reconnect_max": 0.5},
        store={"url": u["store"]},
        agent={"token": TOKEN},
        alerts={"webhook": u["webhook"]},
    )
    caplog.set_level(logging.INFO)
    sidecar = Sidecar(config)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.run)
            await until(lambda: sidecar.broker.last_error)
            assert sidecar.http_port is not None
            pages = {}
            for path in ("/status", "/metrics", "/readyz"):
                _, _, body = await http(sidecar.http_port, path)
                pages[path] = body.decode()
            assert json.loads(pages["/readyz"])["ready"] is False
            sidecar.stop()
    assert "ACCESS_REFUSED" in caplog.text or "refused" in caplog.text.lower()
    assert "127.0.0.1:5672" in caplog.text  # the broker is named, its password is not
    assert_clean(caplog.text, "the log")
    for path, body in pages.items():
        assert_clean(body, path)


TOOLS = [
    ["dlq", "list"],
    ["dlq", "analyze"],
    ["dlq", "show", "some-id"],
    ["scale", "recommend", "--queue", "secrets.test"],
    ["queue", "purge", "--queue", "secrets.test", "--priority", "low", "--yes"],
    ["config", "check", "CONFIG"],
]


@pytest.mark.parametrize("argv", TOOLS, ids=lambda a: " ".join(a[:2]))
def test_tools_print_no_secret(tmp_path: Path, argv: list[str]) -> None:
    u = urls()
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[broker]\nurl = "{u["broker"]}"\n[store]\nurl = "{u["store"]}"\n'
        f'[agent]\ntoken = "{TOKEN}"\n[alerts]\nwebhook = "{u["webhook"]}"\n'
    )
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    if argv[0] != "config":
        argv += ["--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert_clean(output, " ".join(argv[:2]))
