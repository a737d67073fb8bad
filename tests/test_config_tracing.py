"""The ``[tracing]`` section: off by default, validated, documented, and checked by
``config check`` against the packages it needs. With tracing off, OpenTelemetry is never
imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.cli import EXIT_CONFIG, main
from sidecar.config import ConfigError, TracingConfig, example_toml, load_config


def test_tracing_is_off_by_default_with_a_local_collector_endpoint() -> None:
    tracing = load_config(environ={}).tracing
    assert tracing == TracingConfig()
    assert tracing.enabled is False
    assert tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert tracing.sample_ratio == 1.0


def test_environment_variables_set_tracing() -> None:
    tracing = load_config(
        environ={
            "SIDECAR_TRACING_ENABLED": "true",
            "SIDECAR_TRACING_ENDPOINT": "https://collector.example:4318/v1/traces",
            "SIDECAR_TRACING_SERVICE_NAME": "scraper-sidecar",
            "SIDECAR_TRACING_SAMPLE_RATIO": "0.25",
        }
    ).tracing
    assert tracing.enabled is True
    assert tracing.endpoint == "https://collector.example:4318/v1/traces"
    assert tracing.service_name == "scraper-sidecar"
    assert tracing.sample_ratio == 0.25


@pytest.mark.parametrize(
    ("tracing", "named"),
    [
        ({"endpoint": "collector:4318"}, "tracing.endpoint"),
        ({"sample_ratio": 1.5}, "sample_ratio"),
        ({"sample_ratio": -0.1}, "sample_ratio"),
        ({"service_name": " "}, "tracing.service_name"),
        ({"headers": {"bad name": "x"}}, "tracing.headers"),
        ({"headers": {"api-key": "a\r\nInjected: 1"}}, "tracing.headers"),
        ({"exporter": "zipkin"}, "tracing.exporter"),
    ],
)
def test_invalid_tracing_settings_fail_naming_the_key(
    tracing: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(environ={}, overrides={"tracing": tracing})


def test_export_headers_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "otlp-headers"
    path.write_text("# vendor key\napi-key = s3cret\n\nx-team=crawl\n")
    tracing = load_config(environ={}, overrides={"tracing": {"headers_file": str(path)}}).tracing
    assert tracing.headers == {"api-key": "s3cret", "x-team": "crawl"}


@pytest.mark.parametrize("content", ["no separator here\n", "bad name=1\n", b"\xff=1\n"])
def test_a_malformed_headers_file_is_a_config_error(tmp_path: Path, content: str | bytes) -> None:
    path = tmp_path / "otlp-headers"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"tracing\.headers_file"):
        load_config(environ={}, overrides={"tracing": {"headers_file": str(path)}})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(environ={}, overrides={"tracing": {"headers_file": str(tmp_path / "none")}})


def test_the_example_config_documents_the_section() -> None:
    text = example_toml()
    section = text[text.index("[tracing]") :]
    assert "enabled = false" in section
    assert 'endpoint = "http://127.0.0.1:4318/v1/traces"' in section
    assert "sample_ratio = 1.0  #" in section


def test_config_check_passes_with_tracing_on_when_the_packages_are_there(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[tracing]\nenabled = true\n")
    assert main(["config", "check", str(path)]) == 0


def test_config_check_fails_clearly_when_tracing_is_on_without_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As if the otel extra were not installed: importing the SDK fails.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    path = tmp_path / "c.toml"
    path.write_text("[tracing]\nenabled = true\n")
    assert main(["config", "check", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "tracing.enabled" in err and "sidecar[otel]" in err
    assert "Traceback" not in err
    # Off, the same installation passes: the packages are needed only for tracing.
    path.write_text("[tracing]\nenabled = false\n")
    assert main(["config", "check", str(path)]) == 0


def test_with_tracing_off_opentelemetry_is_never_imported(tmp_path: Path) -> None:
    """Building the whole daemon with tracing off loads no OpenTelemetry module."""
    script = textwrap.dedent(
        f"""
        import sys
        from sidecar.config import load_config
        from sidecar.supervisor import Sidecar
        config = load_config(environ={{}}, overrides={{
            "store": {{"url": "sqlite:///{tmp_path}/dlq.db", "spool": "{tmp_path}/spool.db"}},
        }})
        sidecar = Sidecar(config)
        assert sidecar.engine.tracer is None
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_with_tracing_on_the_daemon_gets_an_otlp_tracer(tmp_path: Path) -> None:
    from sidecar.adapters.tracing import OtelTracer
    from sidecar.supervisor import Sidecar

    config = load_config(
        environ={},
        overrides={
            "store": {"url": f"sqlite:///{tmp_path}/dlq.db", "spool": f"{tmp_path}/spool.db"},
            "tracing": {"enabled": True, "endpoint": "http://127.0.0.1:9/v1/traces"},
        },
    )
    sidecar = Sidecar(config)
    try:
        assert isinstance(sidecar.engine.tracer, OtelTracer)
        assert sidecar.tracer is sidecar.engine.tracer
    finally:
        sidecar.tracer.close()  # type: ignore[union-attr]
        sidecar.store.close()
