"""Regenerate the JSON Schemas of the agent protocol from the msgspec structs.

    python proto/generate_schema.py          # rewrite proto/schema/*.schema.json
    python proto/generate_schema.py --check  # exit 1 when the committed files are stale

The structs in ``sidecar/protocol.py`` are the source of truth; the schemas are derived.
"""

from __future__ import annotations

import inspect
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


def normalise(node: Any) -> Any:
    """The schema with every description cleaned the way ``inspect.cleandoc`` cleans a docstring.

    msgspec copies docstrings into descriptions, and versions differ in whether they dedent
    them; cleaning here makes the schema depend on the structs alone.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else normalise(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [normalise(item) for item in node]
    return node


def schema_of(union: Any) -> Any:
    """The schema for one direction as data, descriptions normalised."""
    return normalise(msgspec.json.schema(union))


def render(union: Any) -> str:
    """The schema text for one direction: pretty-printed, sorted keys, trailing newline."""
    return json.dumps(schema_of(union), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected() -> dict[Path, str]:
    return {SCHEMA_DIR / name: render(union) for name, union in TARGETS.items()}


def stale() -> list[Path]:
    """The schema files that are missing or say something other than the structs generate.

    Compared as parsed JSON: what matters is the schema, not its whitespace.
    """
    return [
        path
        for path, union in ((SCHEMA_DIR / name, union) for name, union in TARGETS.items())
        if not path.exists()
        or normalise(json.loads(path.read_text(encoding="utf-8"))) != schema_of(union)
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
