"""The compiled data path (shared/compiled.py, setup.py): what runs is what was tested, an edited
source is never shadowed by an older compiled module, and the compiled modules keep to the rules
mypyc 2.4 needs."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import compiled

#: Calls without side effects, which may stand in a slice's bounds.
PURE_CALLS = frozenset({"len", "min", "max", "int"})
BUILTIN_TYPES = frozenset({"list", "dict", "set", "tuple", "str", "bytes", "bytearray", "int"})
#: Async context managers whose ``__aexit__`` never suspends.
SYNC_EXIT_MANAGERS = frozenset({"timeout", "timeout_at"})


def test_every_data_path_module_runs_compiled_from_its_present_source() -> None:
    """`make test` compiles first (`make compile`): the tests exercise the code that ships.
    After editing a listed module, `make compile` rebuilds (or this fails, naming it)."""
    assert compiled.changed_sources() == [], "sources changed since compiled: run `make compile`"
    for name in compiled.MODULES:
        module = importlib.import_module(name)
        assert compiled.is_compiled(module), f"{name} is not compiled: run `make compile`"
        assert compiled.extension_path(name) is not None
    assert compiled.describe().startswith("data path: compiled with mypyc")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """A package ``pkg`` of two modules whose "compiled" extensions are not loadable (so
    importing one shows which file the import took), built at the sources' present hashes."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("WHERE = 'source a'\n")
    (pkg / "b.py").write_text("WHERE = 'source b'\n")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in ("a", "b"):
        (pkg / f"{name}{suffix}").write_bytes(b"not an extension module")
    (tmp_path / "shared").mkdir()
    hashes = compiled.source_hashes(["pkg.a", "pkg.b"], tmp_path)
    (tmp_path / "shared" / compiled.MANIFEST).write_text(json.dumps(hashes))
    sys.path.insert(0, str(tmp_path))
    finders = list(sys.meta_path)
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.meta_path[:] = finders
        for name in ("pkg", "pkg.a", "pkg.b"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()


def test_a_current_build_is_imported_compiled(tree: Path) -> None:
    assert compiled.guard(["pkg.a", "pkg.b"], tree) == []
    assert compiled.up_to_date(["pkg.a", "pkg.b"], tree)
    with pytest.raises(ImportError):  # the import took the extension module
        importlib.import_module("pkg.a")


def test_an_edited_source_sends_every_listed_module_to_its_source(tree: Path) -> None:
    (tree / "pkg" / "b.py").write_text("WHERE = 'edited b'\n")
    assert compiled.guard(["pkg.a", "pkg.b"], tree) == ["pkg.b"]
    assert not compiled.up_to_date(["pkg.a", "pkg.b"], tree)
    # a, unchanged, comes from its source too: compiled modules must not be mixed with a changed one
    assert importlib.import_module("pkg.a").WHERE == "source a"
    assert importlib.import_module("pkg.b").WHERE == "edited b"
    assert compiled.guard(["pkg.a", "pkg.b"], tree) == ["pkg.b"]
    mine = [f for f in sys.meta_path if isinstance(f, compiled.FromSource) and f.root == tree]
    assert len(mine) == 1  # installed once


def test_a_module_missing_from_the_manifest_counts_as_changed(tree: Path) -> None:
    (tree / "pkg" / "c.py").write_text("WHERE = 'source c'\n")
    # and b, which the build compiled, is no longer listed: counted too
    assert compiled.changed_sources(["pkg.a", "pkg.c"], tree) == ["pkg.c", "pkg.b"]


def test_a_stray_extension_of_a_module_no_longer_compiled_is_not_imported(tree: Path) -> None:
    """A build that compiled more left pkg/c's extension; pkg.c is no longer listed."""
    (tree / "pkg" / "c.py").write_text("WHERE = 'source c'\n")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tree / "pkg" / f"c{suffix}").write_bytes(b"not an extension module")
    assert compiled.stray_extensions(["pkg.a", "pkg.b"], tree) == [tree / "pkg" / f"c{suffix}"]
    assert not compiled.up_to_date(["pkg.a", "pkg.b"], tree)
    assert compiled.guard(["pkg.a", "pkg.b"], tree) == ["pkg.c"]
    assert importlib.import_module("pkg.c").WHERE == "source c"
    assert importlib.import_module("pkg.a").WHERE == "source a"


def test_a_module_the_manifest_lists_but_the_build_no_longer_does_is_not_imported(
    tree: Path,
) -> None:
    assert compiled.guard(["pkg.a"], tree) == ["pkg.b"]  # built with b, b since dropped
    assert importlib.import_module("pkg.b").WHERE == "source b"


def test_module_names_of_extension_files(tmp_path: Path) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    assert compiled.module_of(tmp_path / "a" / f"b{suffix}", tmp_path) == "a.b"
    assert compiled.module_of(tmp_path / "a" / f"__init__{suffix}", tmp_path) == "a"


def test_without_a_manifest_nothing_was_compiled(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("")
    assert compiled.changed_sources(["m"], tmp_path) is None
    assert compiled.guard(["m"], tmp_path) is None
    assert not compiled.up_to_date(["m"], tmp_path)


def test_the_manifest_holds_the_sha256_of_each_source(tree: Path) -> None:
    recorded = json.loads((tree / "shared" / compiled.MANIFEST).read_text())
    source = (tree / "pkg" / "a.py").read_bytes()
    assert recorded["pkg.a"] == hashlib.sha256(source).hexdigest()


def test_a_package_is_listed_by_its_init() -> None:
    assert compiled.source_path("shared.protocol").name == "__init__.py"
    assert compiled.source_path("shared.link").name == "link.py"


def _violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper, node.step):
                for call in ast.walk(bound) if bound is not None else ():
                    if isinstance(call, ast.Call) and not (
                        isinstance(call.func, ast.Name) and call.func.id in PURE_CALLS
                    ):
                        found.append(f"line {node.lineno}: a call in a slice's bounds")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.value if isinstance(base, ast.Subscript) else base
                if isinstance(name, ast.Name) and name.id in BUILTIN_TYPES:
                    found.append(f"line {node.lineno}: class {node.name} subclasses {name.id}")
    return found


def _awaits_after(body: list[ast.stmt], line: int) -> bool:
    return any(
        isinstance(node, ast.Await) and node.lineno < line
        for stmt in body
        for node in ast.walk(stmt)
    )


def _exc_state_violations(source: str) -> list[str]:
    """What in a coroutine depends on the handled exception (``sys.exc_info()``) across an
    ``await``: a compiled coroutine does not own that state, the thread does."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Try) and any(
                isinstance(n, ast.Await) for stmt in node.finalbody for n in ast.walk(stmt)
            ):
                found.append(f"line {node.lineno}: an await in a finally block")
            if isinstance(node, ast.AsyncWith):
                for item in node.items:
                    call = item.context_expr
                    name = call.func if isinstance(call, ast.Call) else call
                    if not (isinstance(name, ast.Attribute) and name.attr in SYNC_EXIT_MANAGERS):
                        found.append(f"line {node.lineno}: an async with that may suspend")
            if isinstance(node, ast.ExceptHandler):
                for inner in (n for stmt in node.body for n in ast.walk(stmt)):
                    if isinstance(inner, ast.Raise):
                        reads = inner.exc is None
                    elif isinstance(inner, ast.Call):
                        func = inner.func
                        reads = isinstance(func, ast.Attribute) and func.attr == "exception"
                    else:
                        continue
                    if reads and _awaits_after(node.body, inner.lineno):
                        found.append(
                            f"line {inner.lineno}: the handled exception read after an await"
                        )
    return found


def test_the_exception_state_checker_finds_each_construct() -> None:
    source = """
async def f():
    try:
        await g()
    finally:
        await h()
    async with lock:
        pass
    try:
        pass
    except E:
        await h()
        raise
    try:
        pass
    except E:
        await h()
        log.exception("x")
"""
    assert _exc_state_violations(source) == [
        "line 3: an await in a finally block",
        "line 7: an async with that may suspend",
        "line 13: the handled exception read after an await",
        "line 18: the handled exception read after an await",
    ]
    fine = """
async def f():
    try:
        await g()
    except BaseException as exc:
        await h()
        raise exc
    finally:
        h.cancel()
    async with asyncio.timeout(1):
        await g()
    try:
        pass
    except E:
        raise
def s():
    try:
        pass
    finally:
        pass
"""
    assert _exc_state_violations(fine) == []


def test_the_rule_checker_finds_both_constructs() -> None:
    assert sorted(_violations("v = v[f(v):]\nclass P(list[int]): pass\n")) == [
        "line 1: a call in a slice's bounds",
        "line 2: class P subclasses list",
    ]
    assert _violations("v = v[len(v) - 1 :]\nclass P(Base): pass\n") == []


@pytest.mark.parametrize("module", compiled.MODULES)
def test_compiled_modules_avoid_what_mypyc_miscompiles(module: str) -> None:
    """mypyc 2.4 evaluates a call in a slice's bounds twice when it slices a bytearray or a
    memoryview (a stream's bytes were counted twice), and cannot compile a subclass of a
    built-in type."""
    assert _violations(compiled.source_path(module).read_text()) == []


@pytest.mark.parametrize("module", compiled.MODULES)
def test_compiled_coroutines_never_read_the_handled_exception_across_an_await(
    module: str,
) -> None:
    """mypyc 2.4 keeps the exception being handled where the interpreter does, in the
    thread's state, not in the coroutine: an await lets other tasks change it, and an
    exception thrown into a coroutine (a task woken by a failed future) is also the one its
    awaiting callers handle. So after an await it may be another task's exception or none:
    a finally block with an await re-raised, after a request's normal end, the link error
    its callee had handled (and swallowed a real one); a bare ``raise`` or an async with
    whose ``__aexit__`` suspends raised another task's exception."""
    assert _exc_state_violations(compiled.source_path(module).read_text()) == []
