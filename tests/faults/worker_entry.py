"""Test-only entry point: ``outboxctl worker`` with fault hooks chosen by ``OUTBOX_TEST_*`` variables.

Production code never reads these variables; only this module does, and only the fault suite runs
it. What it adds to a real worker process:

- its PostgreSQL sessions carry ``application_name = outbox-relay/<worker id>``, so the mark audit
  can tell which worker made each mark (``history_io.audit_ddl``);
- ``OUTBOX_TEST_HOOK_LOG``: a JSON-lines file of hook events (waves, marks, freezes);
- ``OUTBOX_TEST_EXIT_BEFORE_MARK=N``: ``os._exit(99)`` at the N-th mark of acked rows, after the
  publishes were acked and before the mark statement ran (the crash window of a relay);
- ``OUTBOX_TEST_FREEZE_AFTER_WAVE=S``: after the first wave with acked rows, block the whole process
  for S seconds (no lease renewal, no I/O: a stop-the-world pause), then continue;
- ``OUTBOX_TEST_BROKEN=mark_before_ack``: a deliberately broken relay that reports every publish
  as acked as soon as it is handed to the client (marks before the ack);
- ``OUTBOX_TEST_BROKEN=cursor``: a deliberately broken relay that claims with an ``id > last_seen``
  cursor instead of "not yet published".

Every patch is written against the real signature and type-checked (``tests/test_static.py`` runs
mypy on this file): the hooks subclass :class:`RelayHooks` with ``@override``, and each broken method
is a function whose ``self`` and parameters are the real class's, assigned with only
``method-assign`` silenced, so mypy still compares the two signatures. A refactor that renames or
reshapes a patched method fails the static check instead of silently disarming a fault test. Each
broken step also writes a hook event (``broken_publish_wave``, ``cursor_claim``), so a test can see
that the patch ran, and :func:`install` asserts every patch is in place before the worker starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from typing_extensions import override

from outbox_cli.main import main as cli_main
from outbox_common.envelope import OutboxRow
from outbox_worker.adapters import store
from outbox_worker.adapters.publisher import JetStreamPublisher, MessageFields
from outbox_worker.adapters.store import Claim, MarkFirst, OutboxStore
from outbox_worker.app import relay
from outbox_worker.core.policy import Outcome, PublishResult

WORKER_ID = os.environ.get("OUTBOX_WORKER_ID", "")
HOOK_LOG = os.environ.get("OUTBOX_TEST_HOOK_LOG", "")
EXIT_BEFORE_MARK = int(os.environ.get("OUTBOX_TEST_EXIT_BEFORE_MARK", "0") or 0)
FREEZE_AFTER_WAVE = float(os.environ.get("OUTBOX_TEST_FREEZE_AFTER_WAVE", "0") or 0)
BROKEN = os.environ.get("OUTBOX_TEST_BROKEN", "")


def record(event: str, **fields: Any) -> None:
    if not HOOK_LOG:
        return
    with open(HOOK_LOG, "a") as f:
        f.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")
        f.flush()


def attribute_sessions() -> None:
    original = asyncpg.create_pool

    def create_pool(*args: Any, **kwargs: Any) -> Any:
        settings = dict(kwargs.get("server_settings") or {})
        settings["application_name"] = f"outbox-relay/{WORKER_ID}"[:63]
        kwargs["server_settings"] = settings
        return original(*args, **kwargs)

    asyncpg.create_pool = create_pool


# --- hooks: the relay's own test seams ------------------------------------------------------------
class FaultHooks(relay.RelayHooks):
    """Records every wave and mark; freezes or exits where ``OUTBOX_TEST_*`` asks."""

    marks_seen = 0
    frozen = False

    @override
    async def after_wave(self, rows: list[OutboxRow], results: list[PublishResult]) -> None:
        ok = sum(1 for r in results if r.ok)
        record("wave", rows=len(rows), ok=ok, partitions=sorted({r.partition for r in rows}))
        if FREEZE_AFTER_WAVE and ok and not FaultHooks.frozen:
            FaultHooks.frozen = True
            record("freeze", seconds=FREEZE_AFTER_WAVE, ids=[r.id for r in rows])
            time.sleep(FREEZE_AFTER_WAVE)  # blocks the event loop: the whole process stands still
            record("resume")

    @override
    async def before_mark(self, ids: list[int]) -> None:
        record("before_mark", n=len(ids), ids=ids[:2000])
        if EXIT_BEFORE_MARK and ids:
            FaultHooks.marks_seen += 1
            if FaultHooks.marks_seen >= EXIT_BEFORE_MARK:
                record("exit_before_mark", n=len(ids))
                os._exit(99)


# --- broken relays: each replaces one method of the real class ------------------------------------
_real_publish_wave = JetStreamPublisher.publish_wave
_unawaited_acks: set[asyncio.Task[list[PublishResult]]] = set()


async def publish_wave_marking_before_the_ack(
    self: JetStreamPublisher, messages: Sequence[MessageFields]
) -> list[PublishResult]:
    """BROKEN: hands the wave to the real publisher and reports every message acked at once; the
    acks are never looked at, so rows are marked even when the broker never stored them."""
    task = asyncio.ensure_future(_real_publish_wave(self, messages))
    _unawaited_acks.add(task)
    task.add_done_callback(_unawaited_acks.discard)
    await asyncio.sleep(0)
    record("broken_publish_wave", n=len(messages))
    return [PublishResult(Outcome.ACKED) for _ in messages]


_cursor_last_seen = 0


async def claim_with_an_id_cursor(
    self: OutboxStore, partitions: Sequence[int], limit: int, ordered: bool, mark_first: MarkFirst | None = None
) -> Claim:
    """BROKEN: claims pending rows with ``id > last_seen`` instead of "not yet published", so a row
    whose transaction commits after a higher id was claimed is never claimed at all. (A mark it
    carries is written as the real claim writes it; the cursor never returns those rows again.)"""
    global _cursor_last_seen
    marked = 0
    if mark_first is not None and mark_first.ids:
        marked = await self.mark_done(mark_first.fence, mark_first.ids, mark_first.delete)
    columns = self.sql._COLUMNS.replace("$PAYLOAD_BOUND", "$4")  # the real claim's columns, payloads unbounded
    records = await self.pool.fetch(
        f"SELECT {columns} FROM {self.sql.outbox} AS o "
        "WHERE o.partition = ANY($1::int[]) AND o.published_at IS NULL AND o.id > $2 "
        "ORDER BY o.id LIMIT $3",
        list(partitions),
        _cursor_last_seen,
        limit,
        store.UNBOUNDED_PAYLOAD,
    )
    rows = [store._row(r) for r in records]
    if rows:
        _cursor_last_seen = max(_cursor_last_seen, max(r.id for r in rows))
    record("cursor_claim", rows=len(rows), last_seen=_cursor_last_seen)
    more = frozenset(partitions) if len(rows) >= limit else frozenset[int]()
    return Claim(rows, more, marked)


def install() -> None:
    """Put the hooks, and the broken method ``OUTBOX_TEST_BROKEN`` names, in place; check they are."""
    relay.RelayHooks = FaultHooks  # type: ignore[misc]
    assert relay.RelayHooks is FaultHooks
    if BROKEN == "mark_before_ack":
        JetStreamPublisher.publish_wave = publish_wave_marking_before_the_ack  # type: ignore[method-assign]
        assert JetStreamPublisher.publish_wave is publish_wave_marking_before_the_ack
    elif BROKEN == "cursor":
        OutboxStore.claim = claim_with_an_id_cursor  # type: ignore[method-assign]
        assert OutboxStore.claim is claim_with_an_id_cursor
    elif BROKEN:
        raise SystemExit(f"unknown OUTBOX_TEST_BROKEN={BROKEN!r}")


def main() -> int:
    attribute_sessions()
    install()
    record("start", pid=os.getpid(), broken=BROKEN)
    return cli_main(["worker"])


if __name__ == "__main__":
    sys.exit(main())
