"""The Dockerfile (it cannot be built here: no Docker engine) runs the same console scripts the
tests run, ships every package of the distribution, and drops root."""

from __future__ import annotations

import re
import tomllib

from tests.deploy.tools import DEPLOY, REPO

DOCKERFILE = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def instructions(name: str) -> list[str]:
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, flags=re.M)]


def test_final_stage_runs_a_console_script_as_non_root() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    (cmd,) = instructions("CMD")
    assert cmd == '["csc", "serve"]'
    assert "csc" in scripts and "csc-agent" in scripts and "csc-portal" in scripts
    assert instructions("ENTRYPOINT") == []  # `docker run IMAGE csc-agent ...` works
    assert instructions("USER")[-1] == "10001:10001"
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (health,) = instructions("HEALTHCHECK")
    assert "/healthz" in health


def test_two_stages_on_one_slim_base() -> None:
    froms = instructions("FROM")
    assert len(froms) == 2
    base = froms[0].split()[0]
    assert "slim" in base and froms[1] == base
    assert "COPY --from=build /opt/csc /opt/csc" in DOCKERFILE


def test_every_package_is_copied() -> None:
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {c.split()[0] for c in instructions("COPY") if not c.startswith("--from")}
    assert packages <= copied


def test_the_data_path_is_compiled_in_the_build_stage_only() -> None:
    build, final = DOCKERFILE.split("\nFROM ", 2)[1:]
    assert "gcc" in build and "gcc" not in final
    copied = " ".join(c for c in instructions("COPY") if not c.startswith("--from"))
    assert "setup.py" in copied.split()
    # the image is refused unless every module of shared/compiled.py runs compiled
    assert "c.up_to_date()" in build
