"""Reading a stream back (``read_stream``), as the bench and the fault suite do to check every run:
it ends within its bound, and when it cannot finish it says where it stopped."""

from __future__ import annotations

import asyncio
import secrets

import nats
import pytest

from outbox_worker.adapters.history_io import read_stream


async def test_a_read_whose_consumer_vanishes_ends_within_its_bound_and_says_where(nats_url: str) -> None:
    """With no consumer to answer, each fetch is a 503 (as in a cluster while the consumer's server
    restarts): the read asks again until its deadline, then raises a TimeoutError naming the
    sequence it reached."""
    stream = f"HIST_{secrets.token_hex(4).upper()}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        for i in range(50_000):
            await nc.publish(f"{stream}.e", str(i).encode())
        await nc.flush()
        for _ in range(100):
            if (await js.stream_info(stream)).state.messages == 50_000:
                break
            await asyncio.sleep(0.05)
        reading = asyncio.create_task(read_stream(nats_url, stream, timeout=3.0, batch=10))
        for _ in range(500):
            consumers = await js.consumers_info(stream)
            if consumers:
                await js.delete_consumer(stream, consumers[0].name)
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("read_stream never created its consumer")
        with pytest.raises(TimeoutError, match=r"stopped at seq \d+/50000"):
            await asyncio.wait_for(reading, 20)
        await js.delete_stream(stream)
    finally:
        await nc.close()
