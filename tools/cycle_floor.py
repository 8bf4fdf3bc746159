"""What the least relay cycle costs on this machine: the worker's CPU for the round trips of a cycle,
paced as the relay runs them at one event per commit, without the relay.

A relay cycle at one event per commit is a wake-up, a claim (a PostgreSQL round trip) and a wave of
a few events (a JetStream round trip). This runs those alone, on the worker's own libraries and
event loop (uvloop, asyncpg on a held connection, the relay's JetStreamPublisher), one cycle every
``--period`` seconds, against the embedded PostgreSQL and nats-server, and prints the process's
CPU per cycle for each variant, in interleaved rounds (this machine's speed drifts within minutes):

- ``timer``: the wake-up alone (an asyncio sleep to the next cycle);
- ``postgres``: the wake-up and ``SELECT 1`` on a held connection;
- ``jetstream``: the wake-up and one wave of ``--events`` messages, awaiting their acks;
- ``both``: the wake-up, the round trip and the wave: the floor of a relay cycle.

Compare ``both`` with ``outboxctl bench --scenario commit-rate``'s worker CPU per event times the
events per claim (docs/benchmarks.md, "the floor of a cycle").

    python tools/cycle_floor.py --rounds 4 --json floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import nats
import uvloop

from outbox_common.config import NatsConfig, PublishConfig
from outbox_devkit.embedded import EmbeddedNats, EmbeddedPostgres
from outbox_worker.adapters.publisher import JetStreamPublisher, Message

Step = Callable[[], Awaitable[None]]


async def _paced(steps: list[Step], cycles: int, period: float) -> float:
    """CPU seconds of this process per cycle, running ``steps`` once every ``period`` seconds."""
    started = time.process_time()
    due = time.monotonic()
    for _ in range(cycles):
        due += period
        for step in steps:
            await step()
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    return (time.process_time() - started) / cycles


async def measure(dsn: str, url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """µs of CPU per cycle of each variant, one figure per round."""
    conn = await asyncpg.connect(dsn)
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name="FLOOR", subjects=["floor.>"], duplicate_window=120)
    await nc.close()
    pub = JetStreamPublisher(NatsConfig.for_url(url), PublishConfig())
    await pub.connect()
    sent = 0

    async def postgres() -> None:
        await conn.fetch("SELECT 1")

    async def jetstream() -> None:
        nonlocal sent
        wave = [Message(f"floor.{i}", b"x" * 200, {"Nats-Msg-Id": f"{sent}-{i}"}) for i in range(args.events)]
        sent += 1
        failed = [r for r in await pub.publish_wave(wave) if not r.ok]
        if failed:
            raise RuntimeError(f"a publish failed: {failed[0]}")

    variants: dict[str, list[Step]] = {
        "timer": [],
        "postgres": [postgres],
        "jetstream": [jetstream],
        "both": [postgres, jetstream],
    }
    out: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for n in range(args.rounds):
            order = list(variants.items())
            if n % 2:
                order.reverse()  # A B C D, D C B A, ...
            for name, steps in order:
                out[name].append(await _paced(steps, args.cycles, args.period) * 1e6)
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in out.items()), flush=True)
    finally:
        await pub.close()
        await conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=1200, help="cycles per variant and round")
    parser.add_argument("--period", type=float, default=0.0063, help="seconds between cycles")
    parser.add_argument("--events", type=int, default=6, help="messages per wave")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with EmbeddedPostgres() as pg, EmbeddedNats() as ns:
        out = uvloop.run(measure(pg.dsn, ns.url, args))
    print(f"CPU µs per cycle, {args.events} events per wave, one cycle every {args.period * 1e3:.1f} ms:")
    for name, figures in out.items():
        print(f"  {name:10s} median {statistics.median(figures):6.0f}   rounds {[round(f) for f in figures]}")
    both = statistics.median(out["both"])
    print(f"  floor per event: {both / args.events:.0f} µs")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "us_per_cycle": out}))


if __name__ == "__main__":
    main()
