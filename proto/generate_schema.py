"""Regenerate the JSON Schemas of the agent protocol from the msgspec structs.

    python proto/generate_schema.py          # rewrite proto/schema/*.schema.json
    python proto/generate_schema.py --check  # exit 1 when the committed files are stale

The structs in ``sidecar/protocol.py`` are the source of truth; the schemas are derived.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sidecar.protocol import AgentFrame, SidecarFrame  # noqa: E402

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
TARGETS: dict[str, Any] = {
    "agent-frames.schema.json": AgentFrame,
    "sidecar-frames.schema.json": SidecarFrame,
}


def render(union: Any) -> str:
    """The schema text for one direction: pretty-printed, sorted keys, trailing newline."""
    schema = msgspec.json.schema(union)
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected() -> dict[Path, str]:
    return {SCHEMA_DIR / name: render(union) for name, union in TARGETS.items()}


def stale() -> list[Path]:
    """The schema files that are missing or differ from what the structs generate."""
    return [
        path
        for path, text in expected().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        paths = stale()
        for path in paths:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        if paths:
            print("run: python proto/generate_schema.py", file=sys.stderr)
        return 1 if paths else 0
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in expected().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
