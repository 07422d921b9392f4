"""Shared fixtures: one lab per test session, reset after each test that uses it.

``lab`` yields the running standard-scenario lab. Whatever a test changes (attack modes, DNS
attacks, a domain's MTA-STS publication, the whole scenario) is put back afterwards, and what
the peers recorded is forgotten, so tests do not see each other's traffic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import settings

from mxguard.lab.lab import Lab
from mxguard.lab.scenario import Scenario, named

# Not the default of `mxguard lab up`, so both can run at once. Runs of *different* test
# files at the same time set their own; two whole-suite runs at once still collide, because
# some files use fixed ranges of their own (127.79-80, 127.201-212) for their private peers.
# Property tests: no per-example deadline (a loaded 2-core CI machine is not a parser bug),
# and in CI a fixed derivation of examples, so that a red CI always means a reproducible
# failure; developers' runs keep exploring new examples.
settings.register_profile("mxguard", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("deep", deadline=None, max_examples=3000)  # MXGUARD_HYPOTHESIS=deep
settings.load_profile(
    os.environ.get("MXGUARD_HYPOTHESIS") or ("ci" if os.environ.get("CI") else "mxguard")
)

LAB_NET = os.environ.get("MXGUARD_TEST_LAB_NET", "127.99")

# The suite's default store and result spool live in a folder of its own, never in the
# developer's (or CI's) ~/.local/state, so that one run cannot leave state to the next.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mxguard-test-state-")


@pytest.fixture(scope="session")
def standard_scenario() -> Scenario:
    return named("standard")


@pytest.fixture(scope="session")
def session_lab(standard_scenario: Scenario) -> Iterator[Lab]:
    if shutil.which("unbound") is None and not any(shutil.which(p) for p in ("/usr/sbin/unbound",)):
        pytest.skip("the lab needs Unbound: apt-get install unbound (scripts/test does it)")
    with Lab(standard_scenario, net=LAB_NET) as lab:
        yield lab


@pytest.fixture
def lab(session_lab: Lab, standard_scenario: Scenario) -> Iterator[Lab]:
    yield session_lab
    restore(session_lab, standard_scenario)


def restore(lab: Lab, original: Scenario) -> None:
    current = lab.scenario
    changed = [d for d in original.domains if d not in current.domains]
    same_shape = len(current.domains) == len(original.domains) and all(
        {h for h in d.hosts} == {h for h in current.domain(d.name).hosts}
        for d in original.domains
        if d.name in {c.name for c in current.domains}
    )
    if not same_shape:
        lab.apply(original)
    else:
        for d in changed:
            lab.update_domain(d)
    for host in original.hosts():
        lab.set_attack(host.name, host.attack)
    lab.clear_records()
