"""Configuration: file, environment, flags; typos and bad values fail loudly."""

from __future__ import annotations

import pytest

from sidecar.cli import EXIT_CONFIG, main
from sidecar.config import ConfigError, env_overrides, example_toml, load_config, redact_url


def test_defaults_work_against_the_local_broker():
    config = load_config(environ={})
    assert config.broker.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert config.retry.max_attempts == 3
    assert (config.depth.warning, config.depth.critical, config.depth.emergency) == (50, 200, 500)
    assert (config.pressure.warning, config.pressure.critical, config.pressure.emergency) == (
        0.7,
        0.8,
        0.9,
    )
    assert (config.breaker.failure_threshold, config.breaker.open_timeout) == (5, 60.0)
    assert config.agent.socket_mode == 0o660


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_text('[broker]\nprefetch = 7\nurl = "amqp://a:b@file/"\n[agent]\nbatch_size = 3\n')
    config = load_config(
        path,
        environ={"SIDECAR_BROKER_PREFETCH": "9", "SIDECAR_RETRY_TIERS": "[1.0, 2.0]"},
        overrides={"broker": {"url": "amqp://flag/"}},
    )
    assert config.broker.prefetch == 9  # environment beats the file
    assert config.broker.url == "amqp://flag/"  # flags beat both
    assert config.agent.batch_size == 3
    assert config.retry.tiers == [1.0, 2.0]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SIDECAR_BROKER_PREFTCH": "5"}, "unknown key 'broker.preftch'"),
        ({"SIDECAR_BROKER_PREFETCH": "0"}, "key 'broker.prefetch': Expected `int` >= 1"),
        ({"SIDECAR_AGENT_DEADLINE": "soon"}, "key 'agent.deadline'"),
        ({"SIDECAR_PRESSURE_WARNING": "0.95"}, "expected warning < critical < emergency"),
        ({"SIDECAR_RETRY_TIERS": "[5.0, 1.0]"}, "retry.tiers"),
        ({"SIDECAR_BROKER_URL": "http://x/"}, "broker.url: expected an amqp://"),
        ({"SIDECAR_HTTP_LISTEN": "nowhere"}, "http.listen: expected HOST:PORT"),
        ({"SIDECAR_BROKER_QUEUES": '["amq.reserved"]'}, "broker.queues"),
    ],
)
def test_typos_and_bad_values_name_the_key(environ, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("`", "`")):
        load_config(environ=environ)


def test_unknown_key_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[retry]\nmax_atempts = 5\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'retry.max_atempts'"):
        load_config(path, environ={})


def test_other_sidecar_variables_are_not_configuration():
    assert env_overrides(
        {"SIDECAR_TEST_MONGO_URI": "mongodb://x", "SIDECAR_BROKER_URL": "amqp://y/"}
    ) == {"broker": {"url": "amqp://y/"}}


def test_example_config_round_trips(tmp_path):
    path = tmp_path / "example.toml"
    path.write_text(example_toml())
    assert load_config(path, environ={}) == load_config(environ={})


def test_redact_url_hides_the_password():
    assert redact_url("amqp://user:s3cret@host:5672/vh") == "amqp://host:5672/vh"
    assert redact_url("mongodb://u:p@a,b/db") == "mongodb://a,b/db"


def test_config_check_command(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text("[agent]\nbatch_size = 5\n")
    assert main(["config", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nbatch_sise = 5\n")
    assert main(["config", "check", str(bad)]) == EXIT_CONFIG
    assert "unknown key 'agent.batch_sise'" in capsys.readouterr().err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("sidecar ")
