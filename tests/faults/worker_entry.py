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
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import asyncpg

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


def install_hooks() -> None:
    from outbox_worker.app import relay

    class FaultHooks(relay.RelayHooks):
        marks_seen = 0
        frozen = False

        async def after_wave(self, rows: list[Any], results: list[Any]) -> None:
            ok = sum(1 for r in results if r.ok)
            record("wave", rows=len(rows), ok=ok, partitions=sorted({r.partition for r in rows}))
            if FREEZE_AFTER_WAVE and ok and not FaultHooks.frozen:
                FaultHooks.frozen = True
                record("freeze", seconds=FREEZE_AFTER_WAVE, ids=[r.id for r in rows])
                time.sleep(FREEZE_AFTER_WAVE)  # blocks the event loop: the whole process stands still
                record("resume")

        async def before_mark(self, ids: list[int]) -> None:
            record("before_mark", n=len(ids), ids=ids[:2000])
            if EXIT_BEFORE_MARK and ids:
                FaultHooks.marks_seen += 1
                if FaultHooks.marks_seen >= EXIT_BEFORE_MARK:
                    record("exit_before_mark", n=len(ids))
                    os._exit(99)

    relay.RelayHooks = FaultHooks  # type: ignore[misc]


def break_relay() -> None:
    from outbox_worker.adapters import publisher as pub
    from outbox_worker.adapters import store
    from outbox_worker.core.policy import Outcome, PublishResult

    if BROKEN == "mark_before_ack":
        original = pub.JetStreamPublisher.publish_wave
        background: set[asyncio.Task[Any]] = set()

        async def publish_wave(self: Any, messages: Any) -> list[PublishResult]:
            task = asyncio.ensure_future(original(self, messages))  # acks are never looked at
            background.add(task)
            task.add_done_callback(background.discard)
            await asyncio.sleep(0)
            return [PublishResult(Outcome.ACKED) for _ in messages]

        pub.JetStreamPublisher.publish_wave = publish_wave  # type: ignore[method-assign]
    elif BROKEN == "cursor":
        last_seen = {"id": 0}

        async def claim(self: Any, partitions: Any, limit: int, ordered: bool) -> list[Any]:
            rows = await self.pool.fetch(
                f"SELECT {self.sql._COLUMNS} FROM {self.sql.outbox} AS o "
                "WHERE o.partition = ANY($1::int[]) AND o.published_at IS NULL AND o.id > $2 "
                "ORDER BY o.id LIMIT $3",
                list(partitions),
                last_seen["id"],
                limit,
            )
            out = [store._row(r) for r in rows]
            if out:
                last_seen["id"] = max(last_seen["id"], max(r.id for r in out))
            return out

        store.OutboxStore.claim = claim  # type: ignore[method-assign]
    elif BROKEN:
        raise SystemExit(f"unknown OUTBOX_TEST_BROKEN={BROKEN!r}")


def main() -> int:
    attribute_sessions()
    install_hooks()
    break_relay()
    record("start", pid=os.getpid())
    from outbox_cli.main import main as cli_main

    return cli_main(["worker"])


if __name__ == "__main__":
    sys.exit(main())
