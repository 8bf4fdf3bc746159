"""Property: whatever a row holds (sizes of payload, identifiers and headers, how many headers, any
characters), it ends published or dead-lettered within ``max_attempts`` tries, never stuck, and its
aggregate's later events are never held back for good. Real PostgreSQL and nats-server; rows drawn
by hypothesis."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_relay_failures import STREAM, worker_settings

from outbox_common import names
from outbox_worker.adapters.history_io import ledger_insert, read_stream, verify
from support.relay import SQL, running, setup_db

MAX_ATTEMPTS = 3
DRAIN_SECONDS = 30.0
_MIGRATED: set[str] = set()
STREAM_MAX_MSG = 512 * 1024  # every example's rows must be published or dead-lettered within this
# Sizes around the limits: nats-server's 64 KiB header block, 256-character tokens, 1 MiB max_payload.
SIZES = st.sampled_from([0, 1, 7, 255, 256, 257, 1000, 30_000, 65_000, 70_000])
PAYLOAD_SIZES = st.sampled_from([0, 10, 4096, 65_536, 1024 * 1024 - 600, 1024 * 1024 + 1])
# PostgreSQL text and jsonb cannot hold NUL; anything else goes, control characters and all
CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))


def sized_text(min_size: int = 0) -> st.SearchStrategy[str]:
    """A string of a drawn size: a short random head, padded with one drawn character."""
    return st.builds(
        lambda head, pad, size: (head + pad * size)[: max(size, min_size)] or pad * min_size,
        st.text(CHARS, max_size=8),
        CHARS,
        SIZES,
    )


def mostly(usual: st.SearchStrategy[str], anything: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``usual`` about four times in five, else ``anything``: most rows are publishable, so a bad row sits
    among good ones of its aggregate."""
    return st.integers(0, 9).flatmap(lambda k: anything if k >= 8 else usual)


# mostly names NATS takes (and the relay's own or Nats-* ones, which it drops), sometimes anything
VALID_NAMES = st.from_regex(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,40}", fullmatch=True)
HEADER_NAMES = mostly(
    st.sampled_from(["baggage", "traceparent", "Nats-Rollup", "outbox-seq"]) | VALID_NAMES, sized_text()
)


@dataclass(frozen=True)
class Row:
    aggregate_type: str
    aggregate_id: str
    event_type: str
    tenant: str
    headers: dict[str, str]
    payload_size: int


ROWS = st.lists(
    st.builds(
        Row,
        # a few aggregates, so a bad row and the good ones after it share one; every value now and
        # then drawn from anything
        aggregate_type=mostly(st.sampled_from(["order", "a.b", "x y\x01\x7f"]), sized_text()),
        aggregate_id=mostly(st.sampled_from(["agg-1", "agg-2", "agg-3"]), sized_text(min_size=1)),
        event_type=mostly(st.just("changed"), sized_text()),
        tenant=mostly(st.sampled_from(["", "acme"]), sized_text()),
        headers=st.dictionaries(
            st.one_of(st.sampled_from(["baggage", "traceparent"]), sized_text()), sized_text(), max_size=4
        ),
        payload_size=PAYLOAD_SIZES,
    ),
    min_size=5,
    max_size=25,
)


async def relay_rows(dsn: str, nats_url: str, rows: list[Row]) -> dict[str, Any]:
    """Insert ``rows`` (with ledger rows) into a fresh outbox, run a worker until the outbox is empty
    (bounded), and return what became of each row."""
    conn = await asyncpg.connect(dsn)
    nc = await nats.connect(nats_url)
    try:
        await conn.execute("TRUNCATE outbox, outbox_dead_letters, outbox_ledger")
        js = nc.jetstream()
        try:
            await js.purge_stream(STREAM)
        except nats.js.errors.NotFoundError:
            # a stream that refuses what the relay cannot know before sending: messages over its
            # max_msg_size get the server's 400/10054, a failed attempt each, until max_attempts
            await js.add_stream(name=STREAM, subjects=["outbox.>"], max_msg_size=STREAM_MAX_MSG, duplicate_window=120)
        event_ids: list[str] = []
        for r in rows:
            async with conn.transaction():
                rec = await conn.fetchrow(
                    SQL.insert_event,
                    r.aggregate_type,
                    r.aggregate_id,
                    r.event_type,
                    b"p" * r.payload_size,
                    json.dumps(r.headers),
                    r.tenant,
                )
                assert rec is not None
                await conn.execute(ledger_insert(SQL), rec[1], f"{r.aggregate_type}/{r.aggregate_id}", rec[0])
                event_ids.append(rec[1])
        started = time.monotonic()
        settings = worker_settings(
            dsn, nats_url, stream_mode="expect", max_attempts=MAX_ATTEMPTS, retry_backoff_max_seconds=0.5
        )
        async with running(settings):
            while await conn.fetchval("SELECT count(*) FROM outbox") and time.monotonic() - started < DRAIN_SECONDS:
                await asyncio.sleep(0.1)
        left = await conn.fetch("SELECT id, attempts, last_error FROM outbox")
        dead = {
            r["event_id"]: r
            for r in await conn.fetch("SELECT event_id::text, attempts, reason FROM outbox_dead_letters")
        }
    finally:
        await nc.close()
        await conn.close()
    stored = {m.event_id for m in await read_stream(nats_url, STREAM)}
    return {"event_ids": event_ids, "left": left, "dead": dead, "stored": stored}


@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,  # the same rows on every run: a failure is reproducible, CI never flakes on new draws
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(rows=ROWS)
def test_every_row_ends_published_or_dead_lettered_within_max_attempts(
    pg_dsn: str, nats_url: str, rows: list[Row]
) -> None:
    if pg_dsn not in _MIGRATED:  # hypothesis runs every example with the same (function) fixtures
        asyncio.run(setup_db(pg_dsn))
        _MIGRATED.add(pg_dsn)
    outcome = asyncio.run(relay_rows(pg_dsn, nats_url, rows))
    assert not outcome["left"], f"rows stuck in the outbox: {[dict(r) for r in outcome['left']]}"
    for event_id in outcome["event_ids"]:
        dead = outcome["dead"].get(event_id)
        assert (event_id in outcome["stored"]) != (dead is not None), event_id  # exactly one of the two
        if dead is not None:
            assert 1 <= dead["attempts"] <= MAX_ATTEMPTS
            if dead["reason"].startswith(names.REASON_PAYLOAD_TOO_LARGE + ": 400/10054"):  # the server's
                assert dead["attempts"] == MAX_ATTEMPTS
            assert names.reason_of(dead["reason"]) in names.DEAD_LETTER_REASONS, dead["reason"]
    report = asyncio.run(verify(pg_dsn, SQL, nats_url, STREAM, expect_drained=True))
    assert report.ok, report.to_dict()
    assert report.published + report.dead_lettered == len(rows)
