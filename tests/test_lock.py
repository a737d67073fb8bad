"""The lock file and pyproject.toml must agree: installs are reproducible on every machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _uv() -> str:
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        pytest.fail("uv is not installed: it is in the dev extra; run `uv sync --extra dev`")
    return found


def test_lock_matches_pyproject() -> None:
    result = subprocess.run(
        [_uv(), "lock", "--check", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        "uv.lock does not match pyproject.toml; update it on purpose with `uv lock` "
        f"and commit both:\n{result.stderr}"
    )


def test_ci_uses_the_lock() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "uv sync --locked" in ci
    pinned = next(line for line in ci.splitlines() if line.startswith("UV_VERSION="))
    version = pinned.split("=", 1)[1].split()[0]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"uv=={version}"' in pyproject, "the uv in .ci/run and in the dev extra differ"
