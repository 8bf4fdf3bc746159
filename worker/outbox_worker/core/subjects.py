"""NATS subject pattern math. Pure."""

from __future__ import annotations


def subject_covers(pattern: str, subject: str) -> bool:
    """True if every subject matched by ``subject`` (itself possibly holding wildcards) is matched
    by ``pattern``. ``*`` matches one token, ``>`` one or more trailing tokens.

    >>> subject_covers("outbox.>", "outbox.*.*")
    True
    >>> subject_covers("outbox.*.created", "outbox.*.*")
    False
    """
    p = pattern.split(".")
    s = subject.split(".")
    for i, pt in enumerate(p):
        if pt == ">":
            return len(s) > i
        if i >= len(s):
            return False
        st = s[i]
        if st == ">":
            return False
        if pt != "*" and pt != st:
            return False
    return len(p) == len(s)
