"""The test tiers (pytest.ini, tests/conftest.py): `pytest -m "not slow"` runs in process only.

A test that is not marked slow fails as soon as it (or a fixture it sets up) starts a process; these
tests check that guard itself, and that every module whose source starts processes marks the tests
that do."""
from __future__ import annotations

import ast
import multiprocessing
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import KIND_MARKERS, ProcessOutsideSlowTier

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# What starts a process in these tests: the helpers of conftest.py and the modules they lean on.
STARTS_PROCESSES = re.compile(r"\b(subprocess\.|Popen\(|run_train\(|launch_command\(|LocalSlurm\(|slurm_cluster\b|"
                              r"screenshot_dashboard\(|os\.system\()")


def test_a_fast_test_that_starts_a_process_fails_with_the_reason():
    with pytest.raises(ProcessOutsideSlowTier, match=r"test_tiers\.py::.* starts a process .* not marked slow"):
        subprocess.run(["true"])
    with pytest.raises(ProcessOutsideSlowTier):
        os.system("true")
    with pytest.raises(ProcessOutsideSlowTier):
        multiprocessing.get_context("spawn").Process(target=print).start()


@pytest.mark.slow
def test_a_slow_test_may_start_processes():
    assert subprocess.run(["true"]).returncode == 0


def _marks(node: ast.AST) -> set[str]:
    """pytest.mark.NAME used in decorators or a module-level pytestmark under `node`."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}


def test_every_module_that_starts_processes_marks_slow_tests():
    """Static companion of the guard (which sees only tests that run here, not those skipped): a test
    module whose source starts processes has a slow mark, on the module or on tests."""
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        source = path.read_text()
        if STARTS_PROCESSES.search(source) and "slow" not in _marks(ast.parse(source)):
            unmarked.append(path.name)
    assert not unmarked, f"start processes but mark no test slow: {unmarked}"


def test_the_markers_are_registered_and_the_readme_names_both_tiers(pytestconfig):
    registered = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert {"slow", *KIND_MARKERS} <= registered, registered
    readme = (REPO / "README.md").read_text()
    assert 'bash .ci/test.sh -m "not slow"' in readme and "bash .ci/test.sh " in readme
