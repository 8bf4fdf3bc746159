"""The checker itself: its findings on hand-made histories, ``outboxctl verify`` (figures, JSON, exit
codes), and deliberately broken relays that it must catch: one that marks rows before their ack, one
that claims with an ``id > last_seen`` cursor."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

import nats

from faults.harness import (
    Rig,
    WorkerProc,
    bulk_insert,
    check,
    fetch,
    pending_count,
    produce,
    wait_drained,
)
from outbox_cli.main import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from outbox_devkit.embedded import free_port
from outbox_worker.core.history import CommittedEvent, MarkRecord, StoredEvent, check_history
from support.polling import wait_for
from support.servers import ControlledNats

# --- the pure checker -----------------------------------------------------------------------------
TRUTH = [CommittedEvent("e1", "o/1", 1), CommittedEvent("e2", "o/1", 2), CommittedEvent("e3", "o/2", 3)]
STORED = [StoredEvent(1, "e1", "o/1", 1, 100.0), StoredEvent(2, "e2", "o/1", 2, 101.0)]


def test_marks_consistent_history_is_ok() -> None:
    marks = [MarkRecord("e1", 100.5, "delete", "w1", True), MarkRecord("e2", 101.5, "delete", "w1", True)]
    r = check_history(TRUTH, STORED, {"e3"}, (), marks)
    assert r.ok
    assert (r.marks, r.pending, r.stale_marks, r.marked_before_stored, r.marked_not_stored) == (2, 1, 0, 0, 0)


def test_mark_without_the_event_in_the_stream_is_reported() -> None:
    marks = [MarkRecord("e1", 100.5, "delete", "w1", True), MarkRecord("e3", 102.0, "delete", "w1", True)]
    r = check_history(TRUTH, STORED, (), (), marks)
    assert (r.lost, r.marked_not_stored) == (1, 1)
    assert r.examples["marked_not_stored"] == ["e3"]
    assert not r.ok


def test_mark_before_the_event_was_stored_is_reported() -> None:
    marks = [MarkRecord("e1", 99.0, "delete", "w1", True)]  # stored at 100.0
    r = check_history(TRUTH, STORED, {"e3"}, (), marks)
    assert r.marked_before_stored == 1
    assert r.lost == 0
    assert not r.ok
    assert check_history(TRUTH, STORED, {"e3"}, (), marks, mark_tolerance=2.0).ok


def test_mark_under_a_stale_lease_is_reported_unknown_markers_are_not_judged() -> None:
    marks = [MarkRecord("e1", 100.5, "delete", "zombie", False), MarkRecord("e2", 101.5, "mark", "", None)]
    r = check_history(TRUTH, STORED, {"e3"}, (), marks)
    assert (r.stale_marks, r.unattributed_marks) == (1, 1)
    assert r.violations() == {"stale_marks": 1}


def test_dead_letter_moves_are_not_publish_marks() -> None:
    marks = [MarkRecord("e3", 100.0, "delete", "w1", True)]
    r = check_history(TRUTH, STORED, (), {"e3"}, marks)
    assert (r.dead_lettered, r.marked_not_stored) == (1, 0)
    assert r.ok


def test_expect_drained_turns_a_backlog_into_a_violation() -> None:
    assert check_history(TRUTH, STORED, {"e3"}).ok
    r = check_history(TRUTH, STORED, {"e3"}, expect_drained=True)
    assert r.violations() == {"pending": 1}
    assert r.examples["pending"] == ["e3"]


# --- outboxctl verify -----------------------------------------------------------------------------
async def verify_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox_cli",
        "verify",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_verify_cli_figures_json_and_exit_codes(pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare(audit=False)
    code, out, err = await verify_cli("--database-url", rig.dsn, "--install-audit")
    assert code == EXIT_OK, err
    assert "mark audit" in out
    await rig.create_stream()
    await bulk_insert(rig.dsn, rig.sql, 2000, 100)
    rig.worker("w1")
    await wait_drained(rig, 30)
    assert rig.stop_all() == [0]
    base = ("--database-url", rig.dsn, "--nats-url", nats_url, "--stream", rig.stream)

    code, out, _ = await verify_cli(*base)
    assert code == EXIT_OK, out
    assert "events committed" in out
    assert "marks audited" in out
    assert out.strip().endswith("OK")

    code, out, _ = await verify_cli(*base, "--json")
    data = json.loads(out)
    assert (code, data["ok"], data["events"], data["published"], data["lost"]) == (EXIT_OK, True, 2000, 2000, 0)

    # lose a stored event: the row was marked, the stream no longer has it
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_msg(rig.stream, 7)
    finally:
        await nc.close()
    code, out, _ = await verify_cli(*base)
    assert code == EXIT_FAILURE
    assert "VIOLATION: lost=1, marked_not_stored=1" in out

    code, _, err = await verify_cli(*base[:4], "--stream", "NOPE")
    assert code == EXIT_CONFIG
    assert "stream 'NOPE' does not exist" in err
    code, _, err = await verify_cli(*base, "--table", "other")
    assert code == EXIT_CONFIG
    assert "other_ledger" in err
    code, _, err = await verify_cli(
        "--database-url", rig.dsn, "--nats-url", f"nats://127.0.0.1:{free_port()}", "--stream", rig.stream
    )
    assert code == EXIT_UNAVAILABLE
    assert "not reachable" in err
    code, _, err = await verify_cli("--nats-url", nats_url, "--stream", rig.stream)
    assert code == EXIT_USAGE
    assert "--database-url is required" in err
    code, _, err = await verify_cli(*base, "--table", "Bad-Name")
    assert code == EXIT_USAGE
    assert "not a valid identifier" in err


# --- deliberately broken relays -------------------------------------------------------------------
def assert_broken_relay_published(worker: WorkerProc, broken_step: str) -> int:
    """The worker ran its broken step (``broken_step`` events in its hook log) and published through
    it; returns the events it published. A broken relay that publishes nothing shows no fault at all,
    so a test that lets it pass proves nothing about the checker."""
    events = worker.hook_events()
    steps = [e for e in events if e["event"] == broken_step]
    assert steps, f"{worker.name} never ran its broken {broken_step}: the fault patch did not take effect"
    published = sum(e["ok"] for e in events if e["event"] == "wave")
    assert published > 0, f"{worker.name} published nothing: the broken relay did not relay at all"
    return published


async def test_broken_relay_marking_before_the_ack_is_caught(
    pg_dsn: str, own_nats: ControlledNats, make_rig: Callable[..., Rig]
) -> None:
    """A relay that treats 'handed to the client' as 'acked' loses every row it claims while the
    broker is down (nats-server SIGKILLed for 3 s); the checker reports them lost and marked without
    being stored, and ``outboxctl verify`` exits 1."""
    rig = make_rig(pg_dsn, own_nats.url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    w = rig.worker("broken", {"OUTBOX_TEST_BROKEN": "mark_before_ack"})
    await wait_for(lambda: w.ready() is True, 20, what="worker ready")
    producer = asyncio.create_task(produce(rig.dsn, rig.sql, 6000, rate=1000, aggregates=300, timeout=60))
    await asyncio.sleep(2)
    own_nats.kill()
    await asyncio.sleep(3)
    own_nats.start()
    await asyncio.wait_for(producer, 60)
    await wait_drained(rig, 30)
    rig.stop_all()
    assert_broken_relay_published(w, "broken_publish_wave")
    report = await check(
        rig,
        "BROKEN relay: marks before the ack (must be caught)",
        "relay reports every publish acked once handed to the client; nats-server SIGKILLed 3s",
        seconds=time.monotonic() - started,
    )
    assert report.published > 0
    assert report.lost > 0
    assert report.marked_not_stored > 0
    assert not report.ok
    code, out, _ = await verify_cli("--database-url", rig.dsn, "--nats-url", own_nats.url, "--stream", rig.stream)
    assert code == EXIT_FAILURE
    assert "VIOLATION: lost=" in out


async def test_broken_relay_with_an_id_cursor_is_caught(
    pg_dsn: str, nats_url: str, make_rig: Callable[..., Rig]
) -> None:
    """A relay that claims ``id > last_seen`` skips rows whose transaction committed after a higher
    id was relayed; they stay pending forever. The checker run with ``expect_drained`` (the relay
    had all the time it needed) reports them; the correct relay, run the same way, leaves none."""
    rig = make_rig(pg_dsn, nats_url)
    await rig.prepare()
    await rig.create_stream()
    started = time.monotonic()
    broken = rig.worker(
        "broken", {"OUTBOX_TEST_BROKEN": "cursor", "OUTBOX_LOOPS": "1", "OUTBOX_POLL_INTERVAL_SECONDS": "0.1"}
    )
    await produce(
        rig.dsn, rig.sql, 3000, producers=6, tx_size=5, slow_ratio=0.3, slow_seconds=0.3, aggregates=120, timeout=60
    )
    await asyncio.sleep(3)  # more than enough for any correct relay to finish
    rig.stop_all()
    published = assert_broken_relay_published(broken, "cursor_claim")
    skipped = await pending_count(rig.dsn, rig.sql)
    report = await check(
        rig,
        "BROKEN relay: id > last_seen cursor (must be caught)",
        "claims with an id cursor while producers commit out of id order (30% of transactions held 0.3s)",
        seconds=time.monotonic() - started,
    )
    assert skipped
    assert report.published == published  # the stream holds what the broken relay published ...
    assert report.pending == skipped  # ... and the rows its cursor skipped are still pending
    assert report.published + skipped == report.events
    assert report.lost == 0  # nothing was marked wrongly: the rows are silently left behind ...
    assert not report.ok  # ... which expect_drained reports
    assert report.violations() == {"pending": skipped}
    code, out, _ = await verify_cli(
        "--database-url", rig.dsn, "--nats-url", nats_url, "--stream", rig.stream, "--expect-drained"
    )
    assert code == EXIT_FAILURE
    assert f"pending={skipped}" in out
    # the same rows, then the real relay: it picks up every row the cursor skipped
    rig.worker("fixed")
    await wait_drained(rig, 30)
    assert rig.stop_all()[-1] == 0
    rows = await fetch(rig.dsn, f"SELECT count(*) AS n FROM {rig.sql.outbox}")
    assert rows[0]["n"] == 0
