"""Helpers shared by the protocol tests: paths into proto/ and loading its scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"


def load_script(name: str) -> ModuleType:
    """Import ``proto/<name>.py`` (proto/ is a directory of tools, not a package)."""
    path = PROTO / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"proto_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
