"""Subject pattern math: does a stream's subject pattern capture every subject the template renders?
A wrong answer either lets the worker start against a stream that drops events (no responders) or
refuses a valid configuration."""

from __future__ import annotations

import pytest

from outbox_worker.core.subjects import subject_covers


@pytest.mark.parametrize(
    ("pattern", "subject", "covers"),
    [
        ("outbox.>", "outbox.*.*", True),
        ("outbox.>", "outbox.a", True),
        ("outbox.>", "outbox", False),  # '>' needs at least one more token
        (">", "a.*.c", True),
        ("outbox.*.*", "outbox.*.*", True),
        ("outbox.*.*", "outbox.order.created", True),
        ("outbox.*.created", "outbox.*.*", False),  # a narrower literal misses other event types
        ("outbox.*", "outbox.*.*", False),  # too few tokens
        ("outbox.*.*.*", "outbox.*.*", False),  # too many tokens
        ("outbox.*.*", "outbox.>", False),  # a '>' subject is wider than any fixed-length pattern
        ("outbox.>", "outbox.>", True),
        ("other.>", "outbox.*.*", False),
        ("outbox.order.*", "outbox.*.*", False),
        ("*.order.*", "outbox.order.created", True),
        ("outbox", "outbox", True),
        ("outbox", "outboxes", False),
    ],
)
def test_subject_covers(pattern: str, subject: str, covers: bool) -> None:
    assert subject_covers(pattern, subject) is covers
