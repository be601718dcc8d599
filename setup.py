"""Builds the data path's modules (shared/compiled.py ``MODULES``) as C extensions with mypyc;
everything else about the package is in pyproject.toml.

``pip install .`` (a wheel, the image) and ``pip install --editable .`` (``make venv``; the
extensions go beside the sources) both compile; ``make compile`` rebuilds in place after a
source changed. Each build records the hashes of the sources it compiled in
``shared/compiled.json``, which the import guard of shared/compiled.py checks.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from mypyc.build import mypycify
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _compiled_module() -> ModuleType:
    """shared/compiled.py itself, loaded without importing the package."""
    spec = importlib.util.spec_from_file_location("_csc_compiled", HERE / "shared" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compiled = _compiled_module()


class BuildExt(build_ext):
    """build_ext that also writes the manifest of the sources it compiled."""

    def run(self) -> None:
        if self.inplace:  # an older build's extension of a module no longer compiled
            for stray in compiled.stray_extensions(compiled.MODULES, HERE):
                stray.unlink()
        super().run()
        target = HERE if self.inplace else Path(self.build_lib)
        manifest = target / "shared" / compiled.MANIFEST
        manifest.parent.mkdir(parents=True, exist_ok=True)
        hashes = compiled.source_hashes(compiled.MODULES, HERE)
        manifest.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


#: mypy's options for the build. The build environment (pip's, isolated) has none of the
#: project's dependencies, so the build reads no config file (the project's is strict, which
#: would refuse the missing libraries' types), sees no installed package and reports no error
#: in the modules it only follows: every build, in place or in a wheel, compiles from the same
#: view, third-party types as ``Any``. `make typecheck` (mypy --strict) checks everything with
#: the real types. The build's cache is its own.
BUILD_OPTIONS = [
    "--config-file=",
    "--python-version=3.11",
    "--ignore-missing-imports",
    "--no-site-packages",
    "--follow-imports=silent",
    "--cache-dir=build/mypyc-cache",
]

setup(
    ext_modules=mypycify(
        BUILD_OPTIONS + [str(compiled.source_path(m, Path("."))) for m in compiled.MODULES],
        group_name=compiled.GROUP,
        opt_level="3",
    ),
    cmdclass={"build_ext": BuildExt},
)
