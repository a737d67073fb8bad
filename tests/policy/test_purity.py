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


# --- the delivery core -------------------------------------------------------------------

SIDECAR_DIR = POLICY_DIR.parent
# What the core (and whatever it imports from the daemon, transitively) must never reach:
# event loops, the broker driver, the filesystem, processes, the clock or randomness.
IMPURE = {
    "aiormq",
    "asyncio",
    "os",
    "pamqp",
    "pathlib",
    "random",
    "socket",
    "subprocess",
    "threading",
    "time",
    "trio",
    "trio_asyncio",
    "trio_websocket",
}


def sidecar_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(other roots, sidecar modules) imported by a file, at any level of the file."""
    roots: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "sidecar":
                names = [f"sidecar.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == "sidecar":
                modules.add(name)
            else:
                roots.add(name.split(".")[0])
    return roots, modules


def module_file(name: str) -> pathlib.Path | None:
    base = SIDECAR_DIR.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_core_reaches_no_io_even_through_what_it_imports():
    start = sorted((SIDECAR_DIR / "core").glob("*.py"))
    assert len(start) >= 4
    seen: dict[str, pathlib.Path] = {}
    todo = [f"sidecar.core.{p.stem}" for p in start]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        roots, modules = sidecar_imports(path)
        bad = roots & IMPURE
        assert not bad, f"{name} (reached from sidecar.core) imports {sorted(bad)}"
        todo += modules
    # The core leans on the policies and the message helpers, not on drivers or adapters.
    for name in seen:
        assert not name.startswith(("sidecar.adapters", "sidecar.runtime")), name


def test_the_layers_point_down():
    """Adapters and the store never import the drivers; core and policy never import
    adapters, the store backends or the drivers; drivers never import the commands; the
    agent libraries need nothing of the daemon but the protocol."""
    drivers = ("sidecar.runtime", "sidecar.supervisor")
    commands = ("sidecar.cli", "sidecar.tools", "sidecar.demo")
    for layer, forbidden in (
        ("runtime", (*commands, "sidecar.supervisor")),
        ("agent", (*drivers, *commands, "sidecar.adapters", "sidecar.store", "sidecar.core")),
        ("adapters", drivers),
        ("store", (*drivers, "sidecar.adapters")),
        ("core", (*drivers, "sidecar.adapters", "sidecar.config", "sidecar.store.base")),
        ("policy", (*drivers, "sidecar.adapters", "sidecar.core", "sidecar.config")),
    ):
        for path in sorted((SIDECAR_DIR / layer).glob("*.py")):
            _, modules = sidecar_imports(path)
            wrong = sorted(m for m in modules if m.startswith(forbidden))
            assert not wrong, f"{layer}/{path.name} imports {wrong}"
