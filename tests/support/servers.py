"""Embedded servers that a test may crash or freeze, alone or as members of a JetStream cluster.

The dev kit's servers and cluster (:mod:`outbox_devkit.embedded`) start, stop and restart; what only
fault tests need is here: :meth:`kill` (a crash: SIGKILL, no shutdown) and :meth:`pause`/:meth:`resume`
(a freeze: SIGSTOP, TCP stays open, nothing answers). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from outbox_devkit.embedded import (
    CLUSTER_SIZE,
    EmbeddedNats,
    EmbeddedNatsCluster,
    EmbeddedPostgres,
    EmbeddedServerError,
    children_of,
    proc_state,
    send_signal,
)


def wait_stopped(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until every pid is in the stopped state (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while any(proc_state(p) not in ("T", "t", None, "Z") for p in pids):
        if time.monotonic() >= deadline:
            raise EmbeddedServerError(f"processes {pids} did not stop within {timeout:.0f}s of SIGSTOP")
        time.sleep(0.005)


class ControlledPostgres(EmbeddedPostgres):
    """:class:`EmbeddedPostgres` that a test can crash (:meth:`kill`) or freeze (:meth:`pause`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._paused: list[int] = []

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and all its children, wait until they are gone."""
        self._paused = []
        pid = self.pid
        if pid is not None:
            self._sigkill_tree(pid, children_of(pid))

    def pause(self) -> None:
        """Freeze the server (SIGSTOP to the postmaster and its children): connections stall.

        Returns once every process is in the stopped state.
        """
        pid = self.pid
        if pid is None:
            raise EmbeddedServerError("cannot pause: PostgreSQL is not running")
        pids = [pid, *children_of(pid)]
        for p in pids:
            send_signal(p, signal.SIGSTOP)
        self._paused = pids
        wait_stopped(pids)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT). No-op when not paused."""
        for p in self._paused:
            send_signal(p, signal.SIGCONT)
        self._paused = []

    def stop(self, timeout: float = 10.0) -> None:
        """Resume a frozen server first: a stopped process cannot shut down."""
        self.resume()
        super().stop(timeout)


class ControlledNats(EmbeddedNats):
    """:class:`EmbeddedNats` that a test can crash (:meth:`kill`) or freeze (:meth:`pause`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._paused = False

    def kill(self) -> None:
        """Crash the server (SIGKILL) and reap it."""
        self._paused = False
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): TCP stays open but nothing is answered.

        Returns once the process is in the stopped state.
        """
        pid = self.pid
        if pid is None:
            raise EmbeddedServerError(f"cannot pause: nats-server {self.name} is not running")
        send_signal(pid, signal.SIGSTOP)
        self._paused = True
        wait_stopped([pid])

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT). No-op when not paused."""
        pid = self.pid
        if pid is not None and self._paused:
            send_signal(pid, signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """Resume a frozen server first: a stopped process handles SIGTERM only once resumed."""
        self.resume()
        super().stop(timeout)


class NatsCluster(EmbeddedNatsCluster[ControlledNats]):
    """The dev kit's JetStream cluster (:class:`EmbeddedNatsCluster`) whose members are
    :class:`ControlledNats`: a test may kill, pause or restart any of them through :attr:`servers`."""

    def __init__(self, size: int = CLUSTER_SIZE, base_dir: Path | None = None, cluster_name: str = "outbox") -> None:
        super().__init__(ControlledNats, size, base_dir, cluster_name)


@contextlib.contextmanager
def nats_server(base_dir: Path, *extra_args: str, config: str | None = None) -> Iterator[EmbeddedNats]:
    """A started nats-server of the test's own in ``base_dir``, with ``extra_args`` (e.g. ``--auth``)
    and, if given, the configuration file text ``config`` (users, accounts, permissions; written
    next to ``base_dir``); stopped on exit."""
    args = list(extra_args)
    if config is not None:
        conf = base_dir.with_name(base_dir.name + ".conf")
        conf.write_text(config)
        args += ["-c", str(conf)]
    server = EmbeddedNats(base_dir=base_dir, extra_args=args)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
