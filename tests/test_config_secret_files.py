"""``broker.url_file`` and ``store.url_file``: URLs with credentials read from mounted files
(Kubernetes Secret volumes) instead of environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.cli import EXIT_CONFIG, main
from sidecar.config import ConfigError, load_config

BROKER = "amqp://app:s3cret@rabbitmq:5672/"
STORE = "postgresql://sidecar:pw@postgres:5432/dlq"


def secret(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_urls_come_from_files(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    broker = secret(tmp_path, "broker", BROKER + "\n")  # as `kubectl create secret` leaves it
    store = secret(tmp_path, "store", f"  {STORE}  ")
    toml.write_text(f'[broker]\nurl_file = "{broker}"\n[store]\nurl_file = "{store}"\n')
    config = load_config(toml, environ={})
    assert config.broker.url == BROKER
    assert config.store.url == STORE


def test_file_from_the_environment(tmp_path: Path) -> None:
    path = secret(tmp_path, "store", STORE)
    config = load_config(environ={"SIDECAR_STORE_URL_FILE": path})
    assert config.store.url == STORE


def test_a_later_layer_wins_whichever_key_it_sets(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(f'[store]\nurl_file = "{secret(tmp_path, "store", STORE)}"\n')
    # A --store flag beats the file named in the config...
    flagged = load_config(toml, environ={}, overrides={"store": {"url": "sqlite:///x.db"}})
    assert flagged.store.url == "sqlite:///x.db"
    assert flagged.store.url_file == ""
    # ...and a file named in the environment beats a url in the config.
    toml.write_text('[store]\nurl = "sqlite:///config.db"\n')
    other = secret(tmp_path, "other", "postgresql://h/other")
    config = load_config(toml, environ={"SIDECAR_STORE_URL_FILE": other})
    assert config.store.url == "postgresql://h/other"


def test_both_in_one_layer_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    path = secret(tmp_path, "broker", BROKER)
    toml.write_text(f'[broker]\nurl = "{BROKER}"\nurl_file = "{path}"\n')
    with pytest.raises(ConfigError, match=r"broker\.url or broker\.url_file, not both"):
        load_config(toml, environ={})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("  \n\n \t\n", "is empty"),
        ("amqp://a/\namqp://b/\n", "holds 2 lines"),
        (b"\xff\xfe".decode("latin-1"), "not UTF-8"),
        ("x" * (64 * 1024 + 1), "larger than"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "broker"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(environ={"SIDECAR_BROKER_URL_FILE": str(path)})
    assert "\n" not in str(info.value)
    assert "broker.url_file" in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.url_file: cannot read .*No such file"):
        load_config(environ={"SIDECAR_STORE_URL_FILE": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match=r"store\.url_file: cannot read"):
        load_config(environ={"SIDECAR_STORE_URL_FILE": str(tmp_path)})  # a directory
    if os.geteuid() != 0:  # root reads any file regardless of its mode
        path = Path(secret(tmp_path, "locked", STORE))
        path.chmod(0)
        with pytest.raises(ConfigError, match="Permission denied"):
            load_config(environ={"SIDECAR_STORE_URL_FILE": str(path)})


def test_the_file_content_is_validated_like_a_url(tmp_path: Path) -> None:
    path = secret(tmp_path, "broker", "http://not-amqp/")
    with pytest.raises(ConfigError, match=r"broker\.url: expected an amqp"):
        load_config(environ={"SIDECAR_BROKER_URL_FILE": path})


def test_config_check_reports_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(f'[store]\nurl_file = "{tmp_path / "absent"}"\n')
    assert main(["config", "check", str(toml)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "store.url_file" in err and err.count("\n") <= 2
