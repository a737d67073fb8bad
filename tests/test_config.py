"""Configuration: file, environment, flags; typos and bad values fail loudly."""

from __future__ import annotations

import re
import tomllib

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


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            '[retry.reasons.VALIDATION_FAILED]\naction = "retry"\n',
            "retry.reasons.VALIDATION_FAILED.action",
        ),
        ('[retry.reasons.HTTP_503]\naction = "retry"\n', "retry.reasons.HTTP_503"),
        ('[retry.reasons.HTTP_503]\nlike = "HTTP_500"\n', "retry.reasons.HTTP_503.like"),
        (
            '[retry.reasons.BAD_PDF]\nkind = "permanent"\naction = "retry"\n',
            "retry.reasons.BAD_PDF.action",
        ),
        (
            "[breaker]\nhalf_open_probes = 1\nhalf_open_successes = 2\n",
            "breaker.half_open_successes",
        ),
    ],
)
def test_config_check_refuses_reason_rules_that_cannot_apply(tmp_path, capsys, toml, key):
    path = tmp_path / "sidecar.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(path, environ={})
    assert main(["config", "check", str(path)]) == 3
    assert key in capsys.readouterr().err


def test_declared_reasons_load(tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_text(
        '[retry.reasons.HTTP_503]\nlike = "NETWORK_ERROR"\n'
        '[retry.reasons.BAD_PDF]\nkind = "permanent"\n'
        "[retry.reasons.TIMEOUT]\nbreaker = false\n"
    )
    config = load_config(path, environ={})
    assert config.retry.reasons["HTTP_503"].like == "NETWORK_ERROR"
    assert config.breaker.half_open_probes == 1


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SIDECAR_RETRY_MAX_ATTEMPTS": "abc"},
         "environment variable SIDECAR_RETRY_MAX_ATTEMPTS='abc': key 'retry.max_attempts'"),
        ({"SIDECAR_BROKER_PREFTCH": "5"},
         "environment variable SIDECAR_BROKER_PREFTCH='5': unknown key 'broker.preftch'"),
        ({"SIDECAR_BROKER_QUEUES": "a,b"}, 'lists are TOML arrays'),
        ({"SIDECAR_RETRY_REASONS": '{ X = { action = "maybe" } }'},
         "environment variable SIDECAR_RETRY_REASONS="),
    ],
)  # fmt: skip
def test_errors_from_the_environment_name_the_variable(tmp_path, environ, message):
    path = tmp_path / "sidecar.toml"
    path.write_text("[agent]\nbatch_size = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    assert message in str(info.value)
    assert "sidecar.toml" not in str(info.value)


def test_secret_values_from_the_environment_are_not_echoed():
    with pytest.raises(ConfigError) as info:
        load_config(environ={"SIDECAR_AGENT_TOKEN": "[1, 2]"})
    assert "SIDECAR_AGENT_TOKEN" in str(info.value) and "[1, 2]" not in str(info.value)


def test_lists_and_maps_in_variables_are_toml_literals():
    config = load_config(
        environ={
            "SIDECAR_BROKER_QUEUES": '["a.q", "b.q"]',
            "SIDECAR_RETRY_REASONS": '{ PARSE_ERROR = { kind = "permanent" } }',
        }
    )
    assert config.broker.queues == ["a.q", "b.q"]
    assert config.retry.reasons["PARSE_ERROR"].kind == "permanent"


def test_example_is_commented_with_octal_modes_and_a_reason_rule():
    text = example_toml()
    assert 'socket_mode = "0660"' in text and "432" not in text
    assert "[retry.reasons.RATE_LIMITED]" in text
    assert "SIDECAR_<SECTION>_<KEY>" in text
    keyed = [line for line in text.splitlines() if " = " in line and not line.startswith("#")]
    assert keyed and all("  # " in line for line in keyed), [
        line for line in keyed if "  # " not in line
    ]
    rule = "\n".join(
        line.removeprefix("# ").split("  #")[0]
        for line in text.splitlines()
        if line.startswith(("# [retry.reasons", "# action", "# backoff", "# max_attempts"))
    )
    parsed = tomllib.loads(rule)
    config = load_config(environ={}, overrides={"retry": {"reasons": parsed["retry"]["reasons"]}})
    assert config.retry.reasons["RATE_LIMITED"].backoff == "rate_limit"


@pytest.mark.parametrize("written", ['"0660"', '"660"', '"0o660"', "0o660", "432"])
def test_socket_mode_is_read_as_chmod_writes_it(tmp_path, written):
    path = tmp_path / "sidecar.toml"
    path.write_text(f"[agent]\nsocket_mode = {written}\n")
    assert load_config(path, environ={}).agent.socket_mode == 0o660
    assert load_config(environ={"SIDECAR_AGENT_SOCKET_MODE": "0660"}).agent.socket_mode == 0o660


@pytest.mark.parametrize("written", ['"rw-rw----"', '"0999"', '"06600"', "4096"])
def test_bad_socket_modes_name_the_key(tmp_path, written):
    path = tmp_path / "sidecar.toml"
    path.write_text(f"[agent]\nsocket_mode = {written}\n")
    with pytest.raises(ConfigError, match=r"agent\.socket_mode"):
        load_config(path, environ={})
