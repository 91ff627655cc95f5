"""The locks hold every pin of pyproject.toml, each with hashes; the image installs from them,
from a base pinned by digest, and runs as a non-root user."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _locked(name: str) -> dict[str, tuple[str, int]]:
    """package -> (version, number of hashes)."""
    text = (ROOT / name).read_text()
    found: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9_.-]+)==([^\s\\]+)", block)
        if head:
            found[head[1].lower().replace("_", "-")] = (head[2], block.count("--hash=sha256:"))
    return found


def _pins(requirements: list[str]) -> dict[str, str]:
    return {r.split("==")[0].lower().replace("_", "-"): r.split("==")[1] for r in requirements}


def test_every_pin_is_locked_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, dev = _pins(project["dependencies"]), _pins(project["optional-dependencies"]["dev"])
    for lock, wanted in (("requirements.lock", runtime), ("requirements-dev.lock", runtime | dev)):
        locked = _locked(lock)
        assert {name: locked.get(name, ("missing", 0))[0] for name in wanted} == wanted, (
            f"{lock}: run make lock"
        )
        assert all(hashes > 0 for _, hashes in locked.values()), lock
    dev_locked = _locked("requirements-dev.lock")
    assert all(dev_locked.get(name) == pin for name, pin in _locked("requirements.lock").items())
    assert {"setuptools", "wheel"} <= set(_locked("requirements-build.lock"))


def test_the_image_is_pinned_hashed_and_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:[^@\s]+@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    assert all(
        line.split()[1] in ("${BASE}",) for line in dockerfile.splitlines() if line.startswith("FROM ")
    )
    assert dockerfile.count("--require-hashes") == 2
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "HTTP_HOST=0.0.0.0" in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes" in makefile and "bandit" in makefile and "audit-lock" in makefile
