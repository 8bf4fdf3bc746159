"""What the same small socket write costs this machine right after the process slept, against in a
tight loop: the part of a relay cycle's CPU that no code change in the relay can remove.

At one event per commit the worker sleeps between cycles (a 6 ms NOTIFY window) and wakes three
times a cycle (docs/benchmarks.md, "the floor of a cycle"). This sends 1,500 bytes on a Unix socket
pair (the receiver is this process: no other process is woken) after sleeping 0, 0.1, 1 and 6.3 ms,
and on loopback TCP to another process that waits in epoll, and prints the median CPU time of the
send (``time.thread_time`` around it). On a VM whose idle vCPUs halt, the first work after a sleep
runs with cold caches and pays for the wake-up; on the 2-vCPU VM of docs/benchmarks.md the send cost
~10 times more after 6.3 ms of sleep than in a loop.

    python tools/wake_cost.py
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import time

SENDS = 1500
DATA = b"x" * 1500


def _median_send_us(sock: socket.socket, sleep: float, drain: socket.socket | None) -> float:
    costs = []
    for _ in range(SENDS):
        started = time.thread_time()
        sock.send(DATA)
        costs.append(time.thread_time() - started)
        if drain is not None:
            drain.recv(65536)
        if sleep:
            time.sleep(sleep)
    return statistics.median(costs) * 1e6


def _tcp_to_a_sleeping_receiver(sleep: float) -> float:
    """Send to another process that waits in epoll (as nats-server and PostgreSQL do)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:  # the receiver: read until the sender closes
        conn, _ = listener.accept()
        poll = select.epoll()
        poll.register(conn.fileno(), select.EPOLLIN)
        while True:
            poll.poll()
            if not conn.recv(65536):
                os._exit(0)
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return _median_send_us(sock, sleep, None)
    finally:
        sock.close()
        os.waitpid(pid, 0)
        listener.close()


def main() -> None:
    a, b = socket.socketpair()
    print(f"CPU µs of one {len(DATA)}-byte send, median of {SENDS}:")
    for sleep in (0.0, 0.0001, 0.001, 0.0063):
        print(f"  socket pair, after sleeping {sleep * 1e3:4.1f} ms: {_median_send_us(a, sleep, b):6.1f}")
    print(f"  loopback TCP to a process in epoll, after 6.3 ms: {_tcp_to_a_sleeping_receiver(0.0063):6.1f}")


if __name__ == "__main__":
    main()
