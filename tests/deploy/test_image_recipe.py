"""The image's recipe, exercised without a container engine: the Dockerfile's own install
steps (its ENV, COPY and RUN up to the install, read from the file, not restated here) run
into a fresh directory and a fresh virtualenv from uv.lock, then ``sidecar --version`` runs
from the result. A change to the Dockerfile's install steps is what this test runs.

Needs the package index (pip downloads the locked wheels, as `docker build` would):
skipped, with the reason, when it cannot be reached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import sidecar
from tests.deploy.test_manifests import DEPLOY, dockerfile_instructions

ROOT = DEPLOY.parent


_OFFLINE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable"
    r"|Name or service not known|ProxyError"
)


def _env_pairs(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split())


def test_dockerfile_install_steps_build_a_working_sidecar(tmp_path: Path) -> None:
    steps = dockerfile_instructions()
    install_at = next(
        i for i, (k, v) in enumerate(steps) if k == "RUN" and "uv export --locked" in v
    )
    before = steps[:install_at]
    workdir = [v for k, v in before if k == "WORKDIR"][-1]
    install = steps[install_at][1]
    assert workdir == "/src" and "/src" in install  # the paths remapped below

    src = tmp_path / "src"
    src.mkdir()
    for key, value in before:
        if key == "COPY":
            *sources, dest = value.split()
            target = src / dest.removeprefix("./")
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)

    # The image's python:3.11-slim gives a bare interpreter whose pip is on PATH.
    prefix = tmp_path / "image-python"
    venv.EnvBuilder(with_pip=True, clear=True).create(prefix)
    # This machine's index and certificate settings (PIP_*, pip.conf) apply, as a build
    # host's would; this test environment's own virtualenv does not.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{prefix / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    for key, value in before:
        if key == "ENV":
            env.update(_env_pairs(value))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    script = re.sub(r"(?<![\w/])/src\b", str(src), install.replace("/tmp/", f"{scratch}/"))
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    if result.returncode != 0 and _OFFLINE.search(output):
        pytest.skip(
            f"the package index is unreachable: image install steps NOT run: {output[-300:]}"
        )
    assert result.returncode == 0, output
    assert not src.exists(), "the recipe removes its sources"  # its `rm -rf /src`
    assert not (prefix / "bin" / "uv").exists(), "uv is uninstalled from the image"

    out = subprocess.run(
        [str(prefix / "bin" / "sidecar"), "--version"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert sidecar.__version__ in out.stdout
    # Installed from the lock: the same versions as this test environment's.
    for dist in ("psycopg", "pymongo", "trio", "aiormq", "msgspec"):
        mine = subprocess.run(
            [sys.executable, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        theirs = subprocess.run(
            [
                str(prefix / "bin" / "python"),
                "-c",
                f"import importlib.metadata as m; print(m.version({dist!r}))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        assert theirs == mine, dist
    # Dev-only packages are not in the image.
    probe = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", "import pytest"],
        capture_output=True,
        timeout=60,
    )
    assert probe.returncode != 0
