"""Static checks as tests, so `pytest` alone is the whole gate: ruff, mypy --strict, import-linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.static

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = f"$ {' '.join(argv)}  (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, output


def test_ruff_check() -> None:
    _run("ruff", "check", ".")


def test_mypy_strict() -> None:
    # No arguments: mypy checks the `packages` listed in pyproject.toml.
    _run("mypy")


def test_mypy_strict_fault_patches_and_test_support() -> None:
    # The fault suite's worker entry patches product methods; checked against their real signatures
    # so that a refactor of the relay cannot silently disarm a fault test (see the file's docstring).
    # tests/support subclasses the dev kit's servers: checked the same way.
    _run("mypy", "tests/faults/worker_entry.py", "tests/support")


def test_import_contracts() -> None:
    _run("lint-imports")
