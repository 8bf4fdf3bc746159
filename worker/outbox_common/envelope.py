"""Envelope: how one outbox row becomes one NATS message (subject, headers, payload). Pure.

The subject is rendered from a template; every placeholder becomes exactly one subject token, with
characters that NATS does not allow in a token (whitespace, '.', '*', '>') replaced by '_'. A value
that cannot form a valid token (empty, or longer than :data:`MAX_TOKEN`) raises
:class:`InvalidSubjectError`: that row can never be published and is dead-lettered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from outbox_common import names

MAX_TOKEN = 256
MAX_SUBJECT = 1024
_BAD = re.compile(r"[\s.*>\x00]")


class InvalidSubjectError(ValueError):
    """A row's values cannot form a valid subject."""


def sanitize_token(value: str) -> str:
    """Map any string to one valid NATS subject token, or raise :class:`InvalidSubjectError`."""
    if not value:
        raise InvalidSubjectError("empty subject token")
    if len(value) > MAX_TOKEN:
        raise InvalidSubjectError(f"subject token longer than {MAX_TOKEN} characters")
    return _BAD.sub("_", value)


@dataclass(frozen=True, slots=True)
class SubjectTemplate:
    """A parsed subject template; :meth:`render` is called once per row, so it stays cheap."""

    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, literal or field name)

    @classmethod
    def parse(cls, template: str) -> SubjectTemplate:
        parts = []
        for token in template.split("."):
            if token.startswith("{") and token.endswith("}"):
                parts.append((True, token[1:-1]))
            else:
                parts.append((False, token))
        return cls(tuple(parts))

    def render(self, fields: Mapping[str, str]) -> str:
        out = [sanitize_token(fields.get(v) or "") if ph else v for ph, v in self.parts]
        subject = ".".join(out)
        if len(subject) > MAX_SUBJECT:
            raise InvalidSubjectError(f"subject longer than {MAX_SUBJECT} characters")
        return subject

    def filter_subject(self) -> str:
        """A subject filter that captures every rendered subject (placeholders become '*')."""
        return ".".join("*" if ph else v for ph, v in self.parts)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending row, as claimed."""

    id: int
    event_id: str
    partition: int
    aggregate_type: str
    aggregate_id: str
    event_type: str
    tenant: str
    payload: bytes
    headers: Mapping[str, str]
    created_at: datetime
    attempts: int


_RESERVED_LOWER = frozenset(h.lower() for h in names.RESERVED_HEADERS)


def build_headers(row: OutboxRow, publisher: str) -> dict[str, str]:
    """Headers of the message for ``row``; user headers never override the relay's own, and user
    headers starting with ``Nats-`` (JetStream control headers) are dropped."""
    # "Nats-*" headers steer the server (Nats-Rollup purges, Nats-Expected-* makes every retry fail):
    # they are the relay's to set, never the row's.
    # Names are compared as NATS clients send them: stripped (" Nats-Msg-Id" goes out as Nats-Msg-Id,
    # and the server honours the first one) and without regard to case.
    headers: dict[str, str] = {}
    for k, v in row.headers.items():
        key = k.strip()
        if key and key.lower() not in _RESERVED_LOWER and not key.lower().startswith("nats-"):
            headers[key] = v
    headers[names.HDR_MSG_ID] = row.event_id
    headers[names.HDR_EVENT_TYPE] = row.event_type
    headers[names.HDR_AGGREGATE_TYPE] = row.aggregate_type
    headers[names.HDR_AGGREGATE_ID] = row.aggregate_id
    headers[names.HDR_OUTBOX_ID] = str(row.id)
    headers[names.HDR_CREATED_AT] = row.created_at.isoformat()
    headers[names.HDR_PUBLISHER] = publisher
    if row.tenant:
        headers[names.HDR_TENANT] = row.tenant
    return headers


def subject_fields(row: OutboxRow) -> dict[str, str]:
    return {
        "aggregate_type": row.aggregate_type,
        "event_type": row.event_type,
        "tenant": row.tenant or "_",
        "aggregate_id": row.aggregate_id,
    }
