"""The import rules of docs/design.md's Layout section, checked by parsing every
module (after h11's ``_state.py``, which states its rules, and
``test_state.py``, which holds it to them).

- ``engine/`` is what nbdkit's embedded Python imports: it imports only the
  standard library, ``nbdkit`` (the plugin), ``engine/`` itself and
  ``nbdloop.sizes``; never click, never the tooling.
- ``engine/plan`` and ``engine/config`` are pure: no cffi, no nbdkit, no I/O.
- Only ``engine/uring`` imports the compiled extension, and nothing leaves
  it as cffi objects: no test imports ``lib`` or ``ffi``.
- ``vm/`` never imports ``engine/``: it runs where the extension is not built.
- Only ``daemon/`` imports ``kernel/netlink``; the CLI never imports the
  daemon's state or servers.
- Only ``uring.check`` makes an OSError out of an errno.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "nbdloop"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
EXTENSION = "nbdloop.engine._uring"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names; ``from a
    import b`` counts as both ``a`` and ``a.b`` (b may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; the rules need absolute ones")
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def modules(under: str = "") -> dict[str, Path]:
    return {module_name(p): p for p in sorted((PACKAGE / under).rglob("*.py"))}


def top(name: str) -> str:
    return name.split(".")[0]


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_packages_are_there():
    # The rules below would pass vacuously on an empty tree.
    names = set(modules())
    for expected in ("nbdloop.engine.plugin", "nbdloop.engine.backing", "nbdloop.engine.plan",
                     "nbdloop.engine.uring", "nbdloop.engine.placement",
                     "nbdloop.engine.config", "nbdloop.vm.runner",
                     "nbdloop.cli.main", "nbdloop.serve.supervise", "nbdloop.kernel.attach",
                     "nbdloop.bench.run", "nbdloop.paths", "nbdloop.sizes"):
        assert expected in names


@pytest.mark.parametrize("name", sorted(modules("engine")))
def test_engine_imports_only_itself_sizes_and_the_stdlib(name):
    path = modules("engine")[name]
    allowed_outside = {"nbdkit"} if name == "nbdloop.engine.plugin" else set()
    for imp in imports(path):
        if top(imp) == "nbdloop":
            assert is_within(imp, "nbdloop.engine") or is_within(imp, "nbdloop.sizes"), \
                f"{name} imports {imp}: the engine may import only engine/ and sizes"
        else:
            assert top(imp) in STDLIB or top(imp) in allowed_outside, \
                f"{name} imports {imp}, which nbdkit's embedded Python may not have"


@pytest.mark.parametrize("name, allowed", [
    ("plan", {"__future__", "errno", "dataclasses"}),
    ("config", {"__future__", "dataclasses", "json", "nbdloop.sizes",
                "nbdloop.sizes.parse_size"}),
])
def test_the_decision_logic_is_pure(name, allowed):
    """plan (a request's segments) and config (what a server serves, and
    the plugin's keys): no I/O, no clock, neither cffi nor nbdkit, so they
    are tested alone."""
    path = modules("engine")[f"nbdloop.engine.{name}"]
    for imp in imports(path):
        assert top(imp) in allowed or imp in allowed, \
            f"{name} imports {imp}: it must do no I/O and import neither cffi nor nbdkit"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("open", "print", "input"), \
                f"{name} calls {node.func.id}() at line {node.lineno}"


def test_only_uring_imports_the_extension():
    everything = {**modules(), **{module_name(p): p for p in (ROOT / "tests").rglob("*.py")}}
    users = {name for name, path in everything.items()
             if any(is_within(i, EXTENSION) for i in imports(path))}
    assert users == {"nbdloop.engine.uring"}


def test_no_cffi_object_leaves_uring():
    from nbdloop.engine import uring
    assert "lib" not in uring.__all__ and "ffi" not in uring.__all__
    for path in (ROOT / "tests").rglob("*.py"):
        for imp in imports(path):
            assert not imp.endswith((".lib", ".ffi")), f"{path.name} imports {imp}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("lib", "ffi") \
                    and isinstance(node.value, ast.Name) and node.value.id == "uring":
                raise AssertionError(f"{path.name}:{node.lineno} uses uring.{node.attr}")


@pytest.mark.parametrize("name", sorted(modules("vm")))
def test_vm_never_imports_the_engine(name):
    for imp in imports(modules("vm")[name]):
        assert not is_within(imp, "nbdloop.engine"), f"{name} imports {imp}"


def test_only_uring_check_builds_an_oserror_from_an_errno():
    """``OSError(errno, message)`` is built in one place; elsewhere an errno
    reaches OSError only through uring.check."""
    builders = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                        and node.func.id == "OSError" and node.args:
                    builders.append(f"{name}.{func.name}")
    assert builders == ["nbdloop.engine.uring.check"]


def test_only_the_daemon_speaks_to_the_nbd_driver():
    """The daemon owns every device: only daemon/ imports kernel/netlink, and
    the CLI asks the daemon (daemon/client, and daemon/main to run it)
    rather than reaching into its state or its servers."""
    for name, path in modules().items():
        found = imports(path)
        if "nbdloop.kernel.netlink" in found:
            assert is_within(name, "nbdloop.daemon"), f"{name} imports kernel.netlink"
        if is_within(name, "nbdloop.cli"):
            for imp in found:
                assert not is_within(imp, "nbdloop.daemon.daemon") and \
                    not is_within(imp, "nbdloop.daemon.servers"), f"{name} imports {imp}"
