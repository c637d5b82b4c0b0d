"""The architecture as rules the code must keep (README, Layout).

Read from the source with `ast`, nothing imported: which package each module
belongs to, and the layer of each package, so that an import that runs the
wrong way, a circle, a private name taken from another module, SQL outside
the catalog or an oversized module fails here, where the reason is stated,
instead of surfacing later as a tangle.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where each package's source lives (pyproject's package-dir mapping).
SOURCES = {
    "vaultsync": ROOT / "vaultsync",
    "vaultsync.fuse": ROOT / "fuse",
    "vaultsync.api": ROOT / "api",
    "vaultsync.replication": ROOT / "replication",
}
LINKS = {"fuse", "api", "replication"}  # vaultsync/<name> links to ../<name>

# The layers, lowest first. A module may import from its own package and from
# packages of a lower layer; the composition roots (the command line and the
# mount daemon) may import from anywhere.
LAYERS: list[set[str]] = [
    {"vaultsync", "vaultsync.errors", "vaultsync.config", "vaultsync.quietlog"},
    {"vaultsync.format"},
    {"vaultsync.engine"},
    {"vaultsync.store"},
    {"vaultsync.points"},
    {"vaultsync.control"},
    {"vaultsync.fuse", "vaultsync.replication", "vaultsync.api"},
]
ROOTS = {"vaultsync.commands", "vaultsync.daemon", "vaultsync.__main__"}

MAX_LINES = 650

# Known departures from the rules, each to be removed by the change that mends it.
# An entry that no longer applies fails the test too, so this list only shrinks.
ALLOWED_UPWARD: set[tuple[str, str]] = set()
ALLOWED_CIRCLES: set[frozenset[str]] = set()
ALLOWED_PRIVATE: set[tuple[str, str]] = set()
ALLOWED_SQL: set[str] = set()
ALLOWED_INTERNALS: set[str] = set()
ALLOWED_LONG: set[str] = set()


@dataclass(frozen=True)
class Module:
    name: str
    path: Path

    @property
    def package(self) -> str:
        """The unit the layers are made of: a subpackage of vaultsync, or a top-level module."""
        parts = self.name.split(".")
        if len(parts) >= 2 and (ROOT / "vaultsync" / parts[1]).is_dir():
            return ".".join(parts[:2])
        return self.name if len(parts) <= 2 else ".".join(parts[:2])


@cache
def modules() -> dict[str, Module]:
    out: dict[str, Module] = {}
    for pkg, src in SOURCES.items():
        for path in sorted(src.rglob("*.py")):
            rel = path.relative_to(src).with_suffix("")
            if pkg == "vaultsync" and rel.parts[0] in LINKS:
                continue  # seen through the link; counted under its own package
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            out[name] = Module(name, path)
    return out


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.name.split(".")
    if mod.path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@cache
def imports() -> dict[str, list[tuple[str, str, int]]]:
    """module -> (imported module, name taken from it or "", line), ours only."""
    mods = modules()
    out: dict[str, list[tuple[str, str, int]]] = {}
    for mod in mods.values():
        found: list[tuple[str, str, int]] = []
        for node in ast.walk(ast.parse(mod.path.read_text(), str(mod.path))):
            if isinstance(node, ast.Import):
                found += [(a.name, "", node.lineno) for a in node.names if a.name in mods]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:
                        found.append((sub, "", node.lineno))
                    elif target in mods:
                        found.append((target, a.name, node.lineno))
        out[mod.name] = found
    return out


def _layer(package: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    return None


def _upward() -> Iterator[tuple[str, str, int]]:
    mods = modules()
    for name, found in imports().items():
        src = mods[name].package
        if src in ROOTS or name in ROOTS:
            continue
        for target, _, line in found:
            dst = mods[target].package
            if dst == src:
                continue
            a, b = _layer(src), _layer(dst)
            assert a is not None, f"{name}: package {src} has no layer in LAYERS"
            if dst in ROOTS or b is None or (b >= a and not (a == 0 and b == 0)):
                yield name, target, line


def test_every_package_has_a_layer() -> None:
    packages = {m.package for m in modules().values()}
    placed = set().union(*LAYERS) | ROOTS
    assert packages <= placed, f"place these in LAYERS or ROOTS: {sorted(packages - placed)}"


def test_imports_run_down_the_layers() -> None:
    found = {(a, b) for a, b, _ in _upward()}
    wrong = [f"{a}:{line} imports {b}" for a, b, line in _upward() if (a, b) not in ALLOWED_UPWARD]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))
    assert found >= ALLOWED_UPWARD, f"mended, drop from ALLOWED_UPWARD: {ALLOWED_UPWARD - found}"


def _circles() -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: {t for t, _, _ in found} for m, found in imports().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    # A package's __init__ importing its own modules is not a circle worth the name.
    circles = [c for c in _circles() if not any(m.endswith("__init__") for m in c)]
    wrong = [sorted(c) for c in circles if c not in ALLOWED_CIRCLES]
    assert not wrong, f"import circles: {wrong}"
    assert set(circles) >= ALLOWED_CIRCLES, "mended, drop from ALLOWED_CIRCLES"


def test_no_private_name_crosses_modules() -> None:
    found = {
        (name, f"{target}.{taken}")
        for name, imps in imports().items()
        for target, taken, _ in imps
        if taken.startswith("_") and not taken.startswith("__")
    }
    assert not found - ALLOWED_PRIVATE, f"private names imported: {sorted(found - ALLOWED_PRIVATE)}"
    assert found >= ALLOWED_PRIVATE, f"mended, drop from ALLOWED_PRIVATE: {ALLOWED_PRIVATE - found}"


# SQL as this code writes it: keywords in capitals.
_SQL = re.compile(
    r"\b(SELECT\b.*\bFROM|INSERT (OR \w+ )?INTO|DELETE FROM|UPDATE \w+ SET|"
    r"CREATE (TABLE|INDEX)|PRAGMA \w+|VACUUM)\b",
    re.S,
)


def test_sql_only_in_the_catalog() -> None:
    found = {
        mod.name
        for mod in modules().values()
        if not mod.name.startswith("vaultsync.engine.catalog")
        for node in ast.walk(ast.parse(mod.path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and _SQL.search(node.value)
    }
    assert not found - ALLOWED_SQL, f"SQL outside the catalog: {sorted(found - ALLOWED_SQL)}"
    assert found >= ALLOWED_SQL, f"mended, drop from ALLOWED_SQL: {ALLOWED_SQL - found}"


# A volume's parts, which only the engine may touch: the others go through its methods.
_INTERNALS = {"catalog", "journal", "codec", "db"}


def _reaches_in(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Attribute) and node.attr in _INTERNALS):
        return False
    base = node.value
    name = (
        base.id
        if isinstance(base, ast.Name)
        else base.attr
        if isinstance(base, ast.Attribute)
        else ""
    )
    return name in ("vol", "volume")


def test_the_engine_is_reached_through_its_methods() -> None:
    found = {
        mod.name
        for mod in modules().values()
        if not mod.name.startswith("vaultsync.engine.")
        for node in ast.walk(ast.parse(mod.path.read_text()))
        if _reaches_in(node)
    }
    wrong = found - ALLOWED_INTERNALS
    assert not wrong, f"reach into a volume's catalog/journal/codec: {sorted(wrong)}"
    assert found >= ALLOWED_INTERNALS, f"mended, drop: {ALLOWED_INTERNALS - found}"


def test_modules_stay_small() -> None:
    long = {
        m.name: n
        for m in modules().values()
        if (n := len(m.path.read_text().splitlines())) > MAX_LINES
    }
    assert not set(long) - ALLOWED_LONG, f"over {MAX_LINES} lines: {long}"
    assert set(long) >= ALLOWED_LONG, f"mended, drop from ALLOWED_LONG: {ALLOWED_LONG - set(long)}"


def test_the_links_show_the_installed_layout() -> None:
    for name in LINKS:
        link = ROOT / "vaultsync" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


def test_every_module_has_its_tests_named() -> None:
    """tests/README.md maps each module to the tests that cover it."""
    text = (ROOT / "tests" / "README.md").read_text()
    missing = [
        name
        for name, mod in modules().items()
        if mod.path.name not in ("__init__.py", "__main__.py")
        and f"`{mod.path.relative_to(ROOT)}`" not in text
    ]
    assert not missing, f"add to the map in tests/README.md: {missing}"
