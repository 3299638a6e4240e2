"""The lock files agree with pyproject.toml: a dependency added or re-ranged there without
``scripts/lock`` fails here, before a fresh install finds out."""

from __future__ import annotations

import re
import tomllib

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness import ROOT

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock_name: str) -> dict[str, str]:
    """The lock's pins that apply to this interpreter and platform."""
    found = {}
    for line in (ROOT / lock_name).read_text().splitlines():
        match = _PIN.match(line)
        if match and (not match.group(3) or Marker(match.group(3)).evaluate()):
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def declared() -> tuple[list[Requirement], list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return runtime, dev


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    runtime, dev = declared()
    locked = pins("requirements-dev.lock")
    for requirement in runtime + dev:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements-dev.lock: run scripts/lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} is outside {requirement.specifier}: run scripts/lock"
        )


def test_the_runtime_lock_is_the_dev_lock_without_the_dev_tools() -> None:
    runtime, _ = declared()
    dev_pins, runtime_pins = pins("requirements-dev.lock"), pins("requirements.lock")
    assert {canonicalize_name(r.name) for r in runtime} <= set(runtime_pins)
    assert "pytest" not in runtime_pins
    differing = {n: (v, dev_pins.get(n)) for n, v in runtime_pins.items() if dev_pins.get(n) != v}
    assert differing == {}, "the two locks disagree: run scripts/lock"


def test_every_install_of_a_lock_resolves_nothing() -> None:
    """The README, .ci/run and the Dockerfile install a lock with ``--no-deps``: the lock is the
    whole tree, and letting pip resolve it let a newer lxml in through an extra (pip 23.2)."""
    for name in ("README.md", ".ci/run", "Dockerfile"):
        installs = [
            line
            for line in (ROOT / name).read_text().splitlines()
            if re.search(r"pip install .*-r requirements(-dev)?\.lock", line)
        ]
        assert installs, f"{name} no longer installs a lock"
        for line in installs:
            assert "--no-deps -r requirements" in line or "--no-deps --require-hashes -r" in line, (
                f"{name} installs a lock without --no-deps: {line.strip()}"
            )
