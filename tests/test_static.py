"""Static checks as tests, so `pytest` alone is the whole gate: ruff, mypy --strict, import-linter."""

from __future__ import annotations

import ast
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


# --- function size ---------------------------------------------------------------------------------
MAX_LINES = 60  # statements of a function's body, its docstring not counted
MAX_PARAMETERS = 6  # not counting self/cls
SIZE_REASON = "Why this size:"  # a one-line reason in the docstring lets a function past the limits
# The runtime and the CLI; the dev kit (worker/outbox_devkit: demo, bench, embedded servers) is not product.
PRODUCT_PACKAGES = ("worker/outbox_worker", "worker/outbox_common", "worker/outbox_cli", "operator")


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    named = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")]
    return len(named) + (a.vararg is not None) + (a.kwarg is not None)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def oversized_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, body lines, parameters) of each function in ``source`` over MAX_LINES or
    MAX_PARAMETERS whose docstring gives no reason (SIZE_REASON)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        lines, params = _body_lines(node), _parameters(node)
        if (lines > MAX_LINES or params > MAX_PARAMETERS) and SIZE_REASON not in (ast.get_docstring(node) or ""):
            found.append((node.name, lines, params))
    return found


def test_the_size_check_finds_a_long_function_and_one_with_many_parameters() -> None:
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    wide = "def wide(a, b, c, d, e, f, g):\n    pass\n"
    fine = "def fine(self, a, b, c, d, e, f):\n    pass\n"  # self is not counted
    source = f"def long():\n{long_body}\n\n{wide}\n{fine}"
    assert oversized_functions(source) == [("long", MAX_LINES + 1, 0), ("wide", 1, 7)]
    excused = f'def long():\n    """{SIZE_REASON} a table read top-down."""\n{long_body}\n'
    assert oversized_functions(excused) == []


def test_no_product_function_is_over_the_size_limits_without_a_reason() -> None:
    """Functions over MAX_LINES statements or MAX_PARAMETERS parameters are split into named steps,
    or say why not in their docstring ("Why this size: ...")."""
    offenders = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for name, lines, params in oversized_functions(path.read_text()):
                offenders.append(f"{rel}::{name} ({lines} lines, {params} parameters)")
    assert offenders == [], "split these into named steps, or give a one-line reason: " + "; ".join(offenders)


def test_the_worker_never_waits_with_asyncio_wait_for() -> None:
    """On Python 3.11 ``asyncio.wait_for`` loses a cancel that comes while the awaited thing
    finishes (it returns the result instead): a cancelled side task then runs on and the worker's
    stop hangs (LeaseManager.wait_changed). The worker waits with ``asyncio.timeout`` instead."""
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "worker" / "outbox_worker").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line
    ]
    assert not found, f"use asyncio.timeout instead of asyncio.wait_for at {found}"
