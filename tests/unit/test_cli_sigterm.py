"""SIGTERM stops `outboxctl demo` and `bench` by cancelling their main coroutine (run_async), never by
raising inside whatever code happens to run: a library interrupted mid-message (asyncpg, nats-py) can
hang the clean-up that must stop the workers and servers they started."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, signal, time
    from outbox_cli import main as cli

    signal.signal(signal.SIGTERM, cli._terminated)  # what main() installs

    async def busy():  # stands for a library's callbacks: almost always running when the signal comes
        try:
            while True:
                t = time.perf_counter()
                while time.perf_counter() - t < 0.005:
                    pass
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            print("busy: cancelled", flush=True)
            raise
        except BaseException as exc:
            print(f"busy: interrupted by {type(exc).__name__}", flush=True)
            raise

    async def command():
        task = asyncio.create_task(busy())
        print("ready", flush=True)
        try:
            await asyncio.sleep(60)
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            print("command: cleaned up", flush=True)

    cli.run_async(command())
    """
)


def test_sigterm_cancels_the_command_at_an_await_and_exits_143() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert out.splitlines() == ["busy: cancelled", "command: cleaned up"], err[-2000:]


def test_sigterm_outside_the_loop_still_exits_143() -> None:
    script = "import signal, time\nfrom outbox_cli import main as cli\nsignal.signal(signal.SIGTERM, cli._terminated)\n"
    # "ready" inside the try: a SIGTERM right after it must land inside, whatever the machine's load
    script += "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
    script += "finally:\n    print('cleaned up', flush=True)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert out == "cleaned up\n"
