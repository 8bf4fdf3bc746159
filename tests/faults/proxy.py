"""A small loopback TCP proxy for network faults between a worker and nats-server.

It runs its own asyncio loop in a daemon thread, so the test's loop may block (kill a server, wait
for a process) without stalling the traffic. Faults, switchable at any time from the test:

- ``blackhole_down`` / ``blackhole_up``: bytes in that direction (down = server → client) are
  discarded, like a one-way network partition. A connection that lost bytes is reset when the
  blackhole is lifted (a NATS stream with a hole in it cannot be resumed; a real half-open
  connection ends the same way, by the client's ping timeout or a reset);
- ``rate``: a bandwidth limit in bytes per second for each direction of each connection (token
  bucket with a small burst), 0 for none.

And one fixed at construction, for PostgreSQL: ``drop_pg_notifications`` discards every
NotificationResponse the server sends (what a transaction-mode pooler does to a LISTEN: the
notifications go to whichever client holds that server connection next), and passes the rest of the
protocol unchanged (:class:`PgNotificationFilter`).

Bounds: it listens on 127.0.0.1 only, accepts at most ``max_connections`` connections over its life,
reads at most 64 KiB at a time, and every connection ends when either side closes or :meth:`stop`
runs; :meth:`stop` waits at most a few seconds for the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

CHUNK = 64 * 1024
BURST_SECONDS = 0.05


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped_up: int = 0
    dropped_down: int = 0
    resets: int = 0
    throttled_seconds: float = 0.0
    notifications_dropped: int = 0


class PgNotificationFilter:
    """The server → client side of a PostgreSQL connection, message by message (a type byte and an
    int32 length that counts itself): drops NotificationResponse ('A') messages, passes every other
    byte as it came. The one-byte answer to an SSLRequest is passed; an accepted SSL ('S') makes the
    rest of the stream opaque, so it is passed unchanged."""

    def __init__(self) -> None:
        self._buf = b""
        self._started = False
        self._opaque = False
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward for ``data`` (whole messages; a partial one waits for the rest)."""
        if self._opaque:
            return data
        buf = self._buf + data
        out = bytearray()
        if not self._started and buf:
            self._started = True
            if buf[:1] == b"S":
                self._opaque = True
                return buf
            if buf[:1] == b"N" and (len(buf) == 1 or buf[1:2] == b"R"):  # SSL refused, then Authentication
                out += buf[:1]
                buf = buf[1:]
        while len(buf) >= 5:
            end = 1 + int.from_bytes(buf[1:5], "big")
            if len(buf) < end:
                break
            if buf[:1] == b"A":
                self.dropped += 1
            else:
                out += buf[:end]
            buf = buf[end:]
        self._buf = buf
        return bytes(out)


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tainted: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        max_connections: int = 500,
        drop_pg_notifications: bool = False,
    ) -> None:
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.drop_pg_notifications = drop_pg_notifications
        self.blackhole_down = False
        self.blackhole_up = False
        self.rate = 0  # bytes/s per direction per connection; 0 = unlimited
        self.stats = ProxyStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    # --- control (from the test's thread) ---------------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("proxy did not start within 5s")
        return self

    def set_blackhole(self, *, down: bool = False, up: bool = False) -> None:
        """Switch one-way loss on or off. Lifting it resets connections that lost bytes."""
        self.blackhole_down, self.blackhole_up = down, up
        if not (down or up) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_tainted)

    def set_rate(self, bytes_per_second: int) -> None:
        self.rate = max(0, int(bytes_per_second))

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._stopped is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the proxy's own loop ---------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for conn in list(self._conns):
                self._close(conn)
            tasks = [t for c in self._conns for t in c.tasks]
            if tasks:
                await asyncio.wait(tasks, timeout=2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stats.connections >= self.max_connections:
            writer.close()
            return
        self.stats.connections += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            writer.close()
            return
        conn = _Conn(writer, up_writer)
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, up_writer, up=True)),
            asyncio.create_task(self._pump(conn, up_reader, writer, up=False)),
        ]
        await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        self._close(conn)
        self._conns.discard(conn)

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        tokens = 0.0
        last = time.monotonic()
        notices = PgNotificationFilter() if self.drop_pg_notifications and not up else None
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while True:  # ends when the peer closes (read returns b"") or the connection is closed
                data = await reader.read(CHUNK)
                if not data:
                    return
                if notices is not None:
                    dropped = notices.dropped
                    data = notices.feed(data)
                    self.stats.notifications_dropped += notices.dropped - dropped
                    if not data:
                        continue
                if self.blackhole_up if up else self.blackhole_down:
                    conn.tainted = True
                    if up:
                        self.stats.dropped_up += len(data)
                    else:
                        self.stats.dropped_down += len(data)
                    continue
                rate = self.rate
                if rate:
                    now = time.monotonic()
                    tokens = min(rate * BURST_SECONDS, tokens + (now - last) * rate)
                    last = now
                    tokens -= len(data)
                    if tokens < 0:
                        wait = -tokens / rate
                        self.stats.throttled_seconds += wait
                        await asyncio.sleep(wait)
                        last = time.monotonic()
                        tokens = 0.0
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)

    def _reset_tainted(self) -> None:
        for conn in list(self._conns):
            if conn.tainted:
                self.stats.resets += 1
                self._close(conn)

    @staticmethod
    def _close(conn: _Conn) -> None:
        for w in (conn.client, conn.server):
            with contextlib.suppress(Exception):
                w.transport.abort()
