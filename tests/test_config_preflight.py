"""``config check`` builds what ``run`` builds (except I/O), and secrets never print.

Regression tests for configs that passed the check and then crashed ``run`` (which
crash-looped under systemd's ExecStartPre), for unreadable config paths, and for broker
passwords shown in the startup line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli import EXIT_CONFIG, main
from sidecar.redact import redact_url, scrub
from sidecar.store.base import parse_store_url


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[retry]\ntiers = [1, 2, 5]\n", "exceeds the largest tier"),
        ('[store]\nurl = "mysql://u:secret-pw@db/dlq"\n', "unknown dead-letter store scheme"),
        ('[store]\nurl = "sqlite://x.db"\n', "bad SQLite URL"),
        ('[store]\nurl = ""\n', "empty dead-letter store URL"),
        ('[broker]\nurl = "amqp://guest:secret-pw/x@h:5672/"\n', "percent-encode"),
    ],
)
def test_check_refuses_what_run_cannot_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, named: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    assert main(["config", "check", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert named in err
    assert "secret-pw" not in err
    assert "Traceback" not in err
    # run refuses it the same way, before anything starts.
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG


def test_check_on_a_directory_is_one_line_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(tmp_path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "is a directory" in err
    assert len(err.splitlines()) == 1


def test_check_on_a_binary_file_is_one_line_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x80" * 50)
    assert main(["config", "check", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "not a text file" in err
    assert len(err.splitlines()) == 1


def test_shipped_config_passes(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = Path(__file__).resolve().parents[1] / "deploy" / "sidecar.toml"
    assert main(["config", "check", str(shipped)]) == 0


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("sqlite:///rel.db", "sqlite"),
        ("sqlite:////abs/x.db", "sqlite"),
        ("plain-file.db", "sqlite"),
        ("mongodb://u:p@h/db", "mongodb"),
        ("mongodb+srv://h/db", "mongodb"),
    ],
)
def test_store_urls_that_open(url: str, kind: str) -> None:
    assert parse_store_url(url)[0] == kind


# --- secrets -----------------------------------------------------------------------------

PASSWORDS = [
    "2Secret@2Secret",  # "@": was shown in part
    "sec/ret/pw",  # "/": was shown in full
    "pa:ss:word",
    "100%sure",
    "pässwörd-ünïcode",
    "q?uery#frag@x/y:z%41",
]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("scheme", ["amqp", "amqps", "mongodb"])
def test_redact_url_never_shows_the_password(scheme: str, password: str) -> None:
    url = f"{scheme}://guest:{password}@broker.example:5672/vhost?heartbeat=5"
    redacted = redact_url(url)
    assert password not in redacted
    for piece in password.replace("@", " ").replace("/", " ").replace(":", " ").split():
        if len(piece) >= 3:
            assert piece not in redacted, (piece, redacted)
    assert redacted.startswith(f"{scheme}://")
    assert "broker.example" in redacted or redacted == f"{scheme}://"


@pytest.mark.parametrize("password", PASSWORDS)
def test_scrub_removes_a_password_echoed_in_driver_text(password: str) -> None:
    url = f"amqp://guest:{password}@h/"
    assert password not in scrub(f"could not connect to {url} as guest:{password}", url)


def test_redact_url_keeps_what_is_not_secret() -> None:
    assert redact_url("amqp://h:5672/vh") == "amqp://h:5672/vh"
    assert redact_url("sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"
    assert redact_url("amqp://u:p@[::1]:5672/") == "amqp://[::1]:5672/"
    assert redact_url("not a url") == "not a url"
