"""Fault-injection scenarios: every test here carries the ``faults`` marker (or ``soak`` instead, for
the long variants, which the default run excludes). Each scenario ends with the history checker;
the figures are printed per scenario and summed up at the end of the session."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults.harness import RESULTS, Rig, worker_logs

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents and item.get_closest_marker("soak") is None:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault scenarios: history checker figures")
    tr.write_line(f"{'scenario':<44}{'events':>8}{'lost':>6}{'dups':>6}{'order':>6}{'dead':>6}{'stale':>6}  result")
    for r in RESULTS:
        result = "ok" if r["ok"] else "VIOLATION"
        tr.write_line(
            f"{r['scenario'][:43]:<44}{r['events']:>8}{r['lost']:>6}{r['duplicates']:>6}"
            f"{r['order_violations']:>6}{r['dead_lettered']:>6}{r['stale_marks']:>6}  {result}"
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep = yield
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed
    return rep


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory for worker logs and hook logs, removed unless the test failed (then printed)."""
    path = Path(tempfile.mkdtemp(prefix="outbox-faults-"))
    yield path
    if request.node.stash.get(_FAILED, True):
        print(f"\n[faults] logs kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_rig(workdir: Path) -> Iterator[Callable[..., Rig]]:
    """Build a :class:`Rig` on given servers; every worker it started is killed afterwards."""
    rigs: list[Rig] = []

    def make(dsn: str, urls: list[str] | str, **kw: object) -> Rig:
        rig = Rig(dsn, [urls] if isinstance(urls, str) else list(urls), workdir, **kw)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if rig.workers and any(w.pid for w in rig.workers):
            print(worker_logs(rig))
        rig.kill_all()
