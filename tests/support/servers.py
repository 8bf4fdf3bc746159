"""Embedded servers that a test may crash or freeze, and a 3-node JetStream cluster.

The dev kit's servers (:mod:`outbox_devkit.embedded`) start, stop and restart; what only fault tests
need is here: :meth:`kill` (a crash: SIGKILL, no shutdown) and :meth:`pause`/:meth:`resume` (a freeze:
SIGSTOP, TCP stays open, nothing answers). Every wait is bounded.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from outbox_devkit.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    ServerLifecycle,
    children_of,
    forget_at_exit,
    free_port,
    log_tail,
    proc_state,
    send_signal,
    stop_at_exit,
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


def peers_ready(meta: dict[str, Any], others: set[str]) -> bool:
    """Whether a meta leader's ``/jsz`` ``meta_cluster`` lists each of ``others`` as current and online."""
    ready = {r.get("name") for r in meta.get("replicas") or [] if r.get("current") and not r.get("offline")}
    return others <= ready


class NatsCluster(ServerLifecycle):
    """``size`` nats-servers forming one JetStream cluster over loopback routes.

    Server ``i`` is named ``n{i}`` and keeps its ports, config file (``n{i}/server.conf``) and
    store across restarts, so single members can be killed and restarted through :attr:`servers`.
    :meth:`start` returns once every member is healthy and all agree on a meta leader.
    """

    def __init__(self, size: int = 3, base_dir: Path | None = None, cluster_name: str = "outbox") -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one server")
        self._owns_dir = base_dir is None
        self._base_dir = base_dir or Path(tempfile.mkdtemp(prefix="outbox-nats-cluster-"))
        self._cluster_name = cluster_name
        self._route_ports = [free_port() for _ in range(size)]
        self.servers: list[ControlledNats] = []
        for i in range(size):
            server_dir = self._base_dir / f"n{i + 1}"
            config = server_dir / "server.conf"
            self.servers.append(ControlledNats(base_dir=server_dir, extra_args=["-c", str(config)], name=f"n{i + 1}"))
        if self._owns_dir:
            stop_at_exit(self)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def start(self, timeout: float = 30.0) -> None:
        """Start all members (in parallel) and wait for health and a meta leader, ≤ ``timeout`` s."""
        deadline = time.monotonic() + timeout
        stop_at_exit(self)
        for server, route_port in zip(self.servers, self._route_ports, strict=True):
            self._write_config(server, route_port)
            server.spawn()
        for server in self.servers:
            server.wait_ready(max(0.1, deadline - time.monotonic()))
        self.wait_meta_leader(max(0.1, deadline - time.monotonic()))

    def wait_meta_leader(self, timeout: float = 30.0) -> str:
        """Wait until every running member reports the same meta leader, and that leader counts every
        other running member as a current, online peer; return the leader's name.

        An agreed leader alone was not enough: a replicated stream created right after it was refused
        now and then with "no suitable peers for placement, peer offline" (err_code 10005), because
        the leader had not yet heard from every peer."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str | None] = {}
        while True:
            seen, metas = {}, {}
            for server in self.servers:
                if not server.running:
                    continue
                try:
                    metas[server.name] = server.jsz().get("meta_cluster", {})
                    seen[server.name] = metas[server.name].get("leader") or None
                except (OSError, ValueError):
                    seen[server.name] = None
            leaders = set(seen.values())
            if seen and len(leaders) == 1 and None not in leaders:
                leader = leaders.pop()
                assert leader is not None
                if leader in metas and peers_ready(metas[leader], set(seen) - {leader}):
                    return leader
            if time.monotonic() >= deadline:
                tails = "\n".join(log_tail(s.log_path, 15) for s in self.servers)
                raise EmbeddedServerError(
                    f"JetStream cluster not ready after {timeout:.0f}s: meta leader seen by each member {seen}, "
                    f"peers as the leader sees them "
                    f"{[m.get('replicas') for n, m in metas.items() if m.get('leader') == n]}\n{tails}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop all members (orderly)."""
        for server in self.servers:
            server.stop()

    def cleanup(self) -> None:
        """Stop all members and remove their directories."""
        self.stop()
        forget_at_exit(self)
        for server in self.servers:
            server.cleanup()
        if self._owns_dir:
            shutil.rmtree(self._base_dir, ignore_errors=True)

    def _atexit_cleanup(self) -> None:
        if self._owns_dir:
            self.cleanup()
        else:
            self.stop()

    def _write_config(self, server: EmbeddedNats, route_port: int) -> None:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self._route_ports if p != route_port)
        server.base_dir.mkdir(parents=True, exist_ok=True)
        (server.base_dir / "server.conf").write_text(
            f"server_name: {server.name}\n"
            f"cluster {{\n"
            f"  name: {self._cluster_name}\n"
            f"  listen: 127.0.0.1:{route_port}\n"
            f"  routes: [{routes}]\n"
            f"}}\n"
            # The store directory comes from the command line (-sd); repeating it here is an error.
            f"jetstream: enabled\n"
        )
