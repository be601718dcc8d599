"""The data path compiled to C: which modules mypyc compiles, and the guard that never lets a
compiled module stand in for a source that changed after it was built.

The modules of :data:`MODULES` are what every relayed request runs through (the frame codec and
multiplexer, the link, the CSC's HTTP front and ingress, the agent's upstream client). setup.py
compiles them with mypyc, unchanged, into one extension group (:data:`GROUP`); ``pip install``
(the image, a wheel) and ``make venv``/``make compile`` (in place, beside the sources) build
them, and Python imports an extension module before a source of the same name. They cut the
CPU per relayed request by about a third (bench/RESULTS.md).

The build writes :data:`MANIFEST` beside this file: the SHA-256 of each module's source as it
was compiled. At the first import of ``shared``, ``csc`` or ``tenant_agent`` the sources are
hashed against it; if any differs (a source edited after ``make compile``), or the manifest
names a module :data:`MODULES` no longer does, or an older build left an extension of a module
no longer compiled, every module of :data:`MODULES` (and those) is imported from its source
instead, all of them, since compiled modules call each other directly and must not be mixed
with a changed one. :func:`describe` says which of
the two runs (``csc serve`` and ``csc-agent`` log it at start). Without a manifest (a checkout
never compiled) everything is imported from source as before.

mypyc compiles the source's meaning, with three rules its version here needs (the unit test
tests/unit/test_compiled.py checks them): no call inside a slice's bounds (mypyc 2.4 evaluates
it twice when slicing a ``bytearray`` or ``memoryview``), no subclass of a built-in type such
as ``list`` in a compiled module (shared/validpairs.py is why), and nothing in a coroutine that
reads the exception being handled after an ``await``: no ``await`` in a ``finally`` block, no
bare ``raise`` (nor ``log.exception``) after an ``await`` in an ``except`` block, no ``async
with`` but ``asyncio.timeout``'s (whose exit never waits). A compiled coroutine keeps that
exception in the thread's state, not its own, so after an await it may be another task's, or
the one its callers handle while they pass a failed future's error down to it: an ingress
request whose agent link ended was answered 502 and then had the link error raised again,
after its ``finally`` awaited, and its connection dropped. Such code catches ``BaseException
as exc``, awaits its cleanup and raises ``exc``, and does the cleanup again after the block
(the HTTP ingress's ``tunnel``). And one for speed: a
dataclass made per request writes its ``__init__`` out (``init=False``), since mypyc compiles
that one but leaves the one ``dataclass`` generates to the interpreter.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: The modules compiled to C, by import name.
MODULES: tuple[str, ...] = (
    "shared.protocol",
    "shared.protocol.codec",
    "shared.protocol.events",
    "shared.protocol.heads",
    "shared.protocol.heartbeat",
    "shared.protocol.mux",
    "shared.protocol.settings",
    "shared.protocol.stream_state",
    "shared.protocol.windows",
    "shared.link",
    "shared.linkstream",
    "shared.linkpace",
    "shared.http1",
    "shared.headers",
    "shared.wakeup",
    "shared.randpool",
    "shared.aio",
    "shared.timerwheel",
    "shared.wsframe",
    "csc.requestmetrics",
    "csc.relay.accesslog",
    "csc.relay.http_front",
    "csc.relay.http_front_request",
    "csc.relay.http_ingress",
    "csc.relay.ingress_stream",
    "csc.relay.limits",
    "csc.relay.routing",
    "csc.relay.websocket",
    "csc.relay.wsframes",
    "tenant_agent.http_exchange",
    "tenant_agent.http_quick",
    "tenant_agent.http_request",
    "tenant_agent.http_upstream",
    "tenant_agent.websocket",
)
#: The extension group: mypyc's shared library is ``shared/native__mypyc.*.so``.
GROUP = "shared.native"
#: Beside this file: ``{module: sha256 of its source}`` as compiled.
MANIFEST = "compiled.json"
#: How the file name of the group's library (in shared/) starts.
GROUP_LIBRARY = GROUP.rsplit(".", 1)[1] + "__mypyc."

#: The directory holding the packages ``shared``, ``csc`` and ``tenant_agent``.
ROOT = Path(__file__).resolve().parent.parent


def source_path(module: str, root: Path = ROOT) -> Path:
    """The source file of ``module`` under ``root``."""
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def source_hashes(modules: Sequence[str] = MODULES, root: Path = ROOT) -> dict[str, str]:
    """``{module: SHA-256 of its source}``: what the build records in :data:`MANIFEST`."""
    return {m: hashlib.sha256(source_path(m, root).read_bytes()).hexdigest() for m in modules}


def changed_sources(modules: Sequence[str] = MODULES, root: Path = ROOT) -> list[str] | None:
    """The modules whose source differs from the one compiled, every one the manifest lacks,
    and every one it lists that ``modules`` no longer does (its compiled module, left beside
    its source, must not be imported either); None when there is no manifest, i.e. nothing
    was compiled."""
    manifest = root / "shared" / MANIFEST
    try:
        recorded: dict[str, str] = json.loads(manifest.read_text())
    except FileNotFoundError:
        return None
    now = source_hashes(modules, root)
    dropped = sorted(set(recorded) - set(modules))
    return [m for m in modules if recorded.get(m) != now[m]] + dropped


class FromSource(importlib.abc.MetaPathFinder):
    """Imports each of ``modules`` from its source under ``root``, never from a compiled
    module beside it."""

    def __init__(self, modules: Sequence[str], root: Path) -> None:
        self.modules = frozenset(modules)
        self.root = root

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        source = source_path(fullname, self.root)
        package = [str(source.parent)] if source.name == "__init__.py" else None
        return importlib.util.spec_from_file_location(
            fullname, source, submodule_search_locations=package
        )


def guard(modules: Sequence[str] = MODULES, root: Path = ROOT) -> list[str] | None:
    """Import ``modules`` from source if any changed since it was compiled or an older build
    left a stray extension; returns those modules (None when nothing was compiled)."""
    changed = changed_sources(modules, root)
    if changed is not None:
        stray = [module_of(p, root) for p in stray_extensions(modules, root)]
        changed = list(dict.fromkeys(changed + stray))
    if changed:
        every = frozenset(modules) | frozenset(changed)
        if not any(
            isinstance(f, FromSource) and f.root == root and f.modules == every
            for f in sys.meta_path
        ):
            sys.meta_path.insert(0, FromSource(sorted(every), root))
    return changed


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was imported from a compiled extension."""
    path = str(getattr(module, "__file__", None) or "")
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def describe() -> str:
    """One line for the start-up log: whether the data path runs compiled."""
    loaded = [sys.modules[m] for m in MODULES if m in sys.modules]
    compiled = sum(is_compiled(m) for m in loaded)
    if CHANGED:
        names = ", ".join(CHANGED[:3]) + (" ..." if len(CHANGED) > 3 else "")
        return f"data path: Python (the compiled build is out of date: {names}; `make compile`)"
    if compiled == 0:
        return "data path: Python (not compiled; `make compile` builds it)"
    return f"data path: compiled with mypyc ({compiled} of {len(loaded)} modules loaded)"


def extension_path(module: str, root: Path = ROOT) -> Path | None:
    """The compiled extension of ``module`` beside its source, if there is one."""
    source = source_path(module, root)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (found := source.with_name(source.stem + suffix)).exists():
            return found
    return None


def up_to_date(modules: Sequence[str] = MODULES, root: Path = ROOT) -> bool:
    """Whether every module has a compiled extension built from its present source, and no
    other module of the packages has one."""
    return (
        changed_sources(modules, root) == []
        and all(extension_path(m, root) is not None for m in modules)
        and not stray_extensions(modules, root)
    )


def module_of(extension: Path, root: Path = ROOT) -> str:
    """The module an extension file under ``root`` is imported as."""
    parts = list(extension.relative_to(root).parts)
    parts[-1] = parts[-1].split(".", 1)[0]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stray_extensions(modules: Sequence[str] = MODULES, root: Path = ROOT) -> list[Path]:
    """Compiled extensions in the packages that belong to no module of ``modules`` (nor to
    the group's shared library): left by a build that compiled more. The build removes them."""
    wanted = {extension_path(m, root) for m in modules}
    stray = []
    for package in sorted({m.split(".", 1)[0] for m in modules}):
        for found in sorted((root / package).rglob("*.so")):
            if found not in wanted and not found.name.startswith(GROUP_LIBRARY):
                stray.append(found)
    return stray


#: What :func:`guard` found at the first import of the packages (see :func:`describe`).
CHANGED = guard()
