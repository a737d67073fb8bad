"""The policy layer stays pure: no I/O, no event loop, no clock or randomness of its own."""

import ast
import pathlib

import sidecar.policy

POLICY_DIR = pathlib.Path(sidecar.policy.__file__).parent
ALLOWED = {
    "__future__",
    "bisect",
    "collections",
    "dataclasses",
    "enum",
    "itertools",
    "math",
    "re",
    "types",
    "typing",
    "sidecar",
}


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
            if node.module.split(".")[0] == "sidecar":
                assert node.module.startswith("sidecar.policy"), f"{path.name}: {node.module}"
    return roots


def test_policy_modules_import_only_pure_stdlib():
    modules = sorted(POLICY_DIR.glob("*.py"))
    assert len(modules) >= 9  # the glob found the package
    for path in modules:
        extra = imported_roots(path) - ALLOWED
        assert not extra, f"{path.name} imports {sorted(extra)}"
