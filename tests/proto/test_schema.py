"""The committed JSON Schemas must match what the msgspec structs generate."""

from __future__ import annotations

import json

import pytest

from sidecar import protocol as p
from tests.proto._util import PROTO, load_script

generator = load_script("generate_schema")
HINT = "the protocol structs changed: run `python proto/generate_schema.py` and commit the result"


@pytest.mark.parametrize("name", sorted(generator.TARGETS))
def test_committed_schema_matches_structs(name: str) -> None:
    path = PROTO / "schema" / name
    assert path.exists(), f"{path} is missing; {HINT}"
    committed = json.loads(path.read_text(encoding="utf-8"))
    assert committed == generator.schema_of(generator.TARGETS[name]), f"{path} is stale; {HINT}"


def test_descriptions_do_not_depend_on_docstring_indentation() -> None:
    indented = {
        "description": "First line.\n\n    Indented detail.\n    ",
        "x": [{"description": "  a"}],
    }
    dedented = {"description": "First line.\n\nIndented detail.", "x": [{"description": "a"}]}
    assert generator.normalise(indented) == generator.normalise(dedented) == dedented


def test_check_mode_reports_nothing_stale() -> None:
    assert generator.stale() == [], HINT


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("agent-frames.schema.json", p.AGENT_KINDS),
        ("sidecar-frames.schema.json", p.SIDECAR_KINDS),
    ],
)
def test_schema_names_every_kind(name: str, kinds: frozenset[str]) -> None:
    schema = json.loads((PROTO / "schema" / name).read_text(encoding="utf-8"))
    mapping = schema["discriminator"]["mapping"]
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(mapping) == set(kinds)
    for ref in mapping.values():
        assert ref.removeprefix("#/$defs/") in schema["$defs"]
