"""The operator's record of its own writes (state.Written): a pass between a write and its watch
event sees the write; once the watch shows it (before or after the answer is handled) the watch wins."""

from __future__ import annotations

from outbox_operator.state import Written

KEY = ("shop", "Deployment", "orders-relay")


def obj(rv: str) -> dict[str, object]:
    return {"metadata": {"name": "orders-relay", "resourceVersion": rv}}


def test_a_write_is_seen_until_its_watch_event_arrives() -> None:
    written = Written()
    written.put(KEY, obj("7"))
    assert written.lookup(KEY) == (True, obj("7"))
    written.seen(KEY, obj("6"))  # an older event still in flight: the write stays newer
    assert written.lookup(KEY) == (True, obj("7"))
    written.seen(KEY, obj("7"))
    assert written.lookup(KEY) == (False, None)


def test_an_answer_handled_after_its_own_watch_event_is_not_kept() -> None:
    written = Written()
    written.seen(KEY, obj("7"))
    written.seen(KEY, obj("8"))  # someone else wrote after the operator
    written.put(KEY, obj("7"))  # the operator's answer for rv 7 is handled only now
    assert written.lookup(KEY) == (False, None)


def test_a_write_the_watch_never_confirms_expires() -> None:
    written = Written(ttl=0.0)
    written.put(KEY, obj("7"))
    assert written.lookup(KEY) == (False, None)


def test_a_delete_is_seen_until_the_watch_shows_it() -> None:
    written = Written()
    written.put(KEY, None)
    assert written.lookup(KEY) == (True, None)
    written.seen(KEY, None)
    assert written.lookup(KEY) == (False, None)
