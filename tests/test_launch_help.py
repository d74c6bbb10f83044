"""Every entry point answers ``--help``, run exactly as the docs spell it, as a new user would.

A new user runs ``python launch/estimate_memory.py`` from a fresh clone: no PYTHONPATH, from the
repository root or from another folder. Python then puts ``launch/`` first on the import path, so a
script there named like a standard-library module (``launch/select.py`` once shadowed ``select``,
and ``import torch`` died in ``selectors``) breaks every launch script. Each script is started as
its own process, so nothing this test process imported can hide such a crash.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (REPO / "launch").glob("*.py"))
# Where a user reads the commands: the READMEs, docs/, and the launch scripts' own docstrings.
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("*/README.md")),
        *sorted((REPO / "launch").glob("*.py"))]
# `python -m` entry points the docs give (run from the repository root, where the package is).
MODULES = ["dreamprm.bestofn"]


def user_env() -> dict[str, str]:
    """A shell without this test run's import path: nothing but the interpreter's own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update({"HWLOC_COMPONENTS": "-gl", "OMP_NUM_THREADS": "1"})
    return env


def docs_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in DOCS)


def assert_help(proc: subprocess.CompletedProcess, prog: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert re.match(rf"usage: {re.escape(prog)} ", proc.stdout), proc.stdout[:500]
    assert "-h, --help" in proc.stdout


def test_there_are_launch_scripts():
    assert {"train.py", "bestofn.py", "estimate_memory.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_docs_spell_each_launch_script_as_python_launch(script):
    """The command this file runs is the one users are told to type."""
    assert re.search(rf"\bpython launch/{re.escape(script)}\b", docs_text()), f"no `python launch/{script}` in the docs"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_help_from_the_repository_root(script):
    proc = subprocess.run([sys.executable, f"launch/{script}", "--help"], cwd=REPO, env=user_env(),
                          capture_output=True, text=True, timeout=180)
    assert_help(proc, f"launch/{script}")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_help_from_another_folder(script, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), "--help"], cwd=tmp_path, env=user_env(),
                          capture_output=True, text=True, timeout=180)
    assert_help(proc, f"launch/{script}")


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_module_help_from_the_repository_root(module):
    assert f"python -m {module} " in docs_text()
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=user_env(),
                          capture_output=True, text=True, timeout=180)
    assert_help(proc, f"python -m {module}")
