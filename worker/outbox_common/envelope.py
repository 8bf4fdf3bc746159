"""Envelope: how one outbox row becomes one NATS message (subject, headers, payload). Pure.

The subject is rendered from a template; every placeholder becomes exactly one subject token, with
characters that NATS does not allow in a token (whitespace, '.', '*', '>') and control characters
(``\x00``-``\x1f``, ``\x7f``) replaced by '_'. A value that cannot form a valid token (empty, or
longer than :data:`MAX_TOKEN`) raises :class:`InvalidSubjectError`, a header name NATS refuses
:class:`InvalidHeaderError`: that row can never be published and is dead-lettered with the error's
:attr:`~InvalidSubjectError.reason`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from outbox_common import names

MAX_TOKEN = 256
MAX_SUBJECT = 1024
_BAD = re.compile(r"[\s.*>\x00-\x1f\x7f]")
# nats-py 2.16's rule for header names (nats/aio/client.py); values are stripped and CR/LF become spaces.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class InvalidSubjectError(ValueError):
    """A row's values cannot form a valid subject: it can never be published."""

    reason = names.REASON_INVALID_SUBJECT


class InvalidHeaderError(InvalidSubjectError):
    """A row's header cannot go out as NATS needs it (a header name it refuses)."""

    reason = names.REASON_INVALID_HEADER


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


@dataclass(slots=True)
class OutboxRow:
    """One pending row, as claimed. Read-only by convention: not frozen, because a claim builds a
    thousand of these per batch and a frozen dataclass costs 2.5 times as much to construct."""

    id: int
    event_id: str
    partition: int
    aggregate_type: str
    aggregate_id: str
    event_type: str
    tenant: str
    payload: bytes | None  # None: over the server's max_payload, left in the table (OutboxStore.limit_payloads)
    headers: Mapping[str, str]
    created_at: str  # RFC 3339 in UTC, microseconds always: the claim's text (created_at_text's)
    attempts: int


def created_at_text(ts: datetime) -> str:
    """``ts`` as the claim renders ``created_at`` (and ``Outbox-Created-At`` carries it): RFC 3339 in
    UTC with six fractional digits, e.g. ``2026-01-02T03:04:05.000120+00:00``. For rows built in
    Python (baselines, tests); an integration test checks that both give the same text."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


_RESERVED_LOWER = frozenset(h.lower() for h in names.RESERVED_HEADERS)


def user_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The row's own headers that go out: names stripped, the relay's names and ``Nats-*`` dropped."""
    # "Nats-*" headers steer the server (Nats-Rollup purges, Nats-Expected-* makes every retry fail):
    # they are the relay's to set, never the row's.
    # Names are compared as NATS clients send them: stripped (" Nats-Msg-Id" goes out as Nats-Msg-Id,
    # and the server honours the first one) and without regard to case.
    kept: dict[str, str] = {}
    for k, v in headers.items():
        key = k.strip()
        if key and key.lower() not in _RESERVED_LOWER and not key.lower().startswith("nats-"):
            kept[key] = v
    return kept


def build_headers(row: OutboxRow, publisher: str) -> dict[str, str]:
    """Headers of the message for ``row``; user headers never override the relay's own, and user
    headers starting with ``Nats-`` (JetStream control headers) are dropped. The relay sends these
    through :class:`HeaderBlock`, which renders the same bytes in one pass."""
    headers = user_headers(row.headers)
    headers[names.HDR_MSG_ID] = row.event_id
    headers[names.HDR_EVENT_TYPE] = row.event_type
    headers[names.HDR_AGGREGATE_TYPE] = row.aggregate_type
    headers[names.HDR_AGGREGATE_ID] = row.aggregate_id
    headers[names.HDR_OUTBOX_ID] = str(row.id)
    headers[names.HDR_CREATED_AT] = row.created_at
    headers[names.HDR_PUBLISHER] = publisher
    if row.tenant:
        headers[names.HDR_TENANT] = row.tenant
    return headers


def header_value(value: str) -> str:
    """A header value as NATS clients send it: stripped, CR/LF replaced by spaces."""
    value = value.strip()
    if "\r" in value or "\n" in value:
        value = value.replace("\r", " ").replace("\n", " ")
    return value


class HeaderBlock:
    """Renders the NATS header block (``NATS/1.0\\r\\n`` … blank line) of a row's message: exactly
    :func:`build_headers` plus ``Nats-Expected-Stream``, encoded as nats-py would (a unit test compares
    the bytes), in one pass. Order on the wire: ``Nats-Trace-Dest`` (only as described below), the
    row's own headers in the row's order, then the relay's (``Nats-Msg-Id`` … ``Nats-Expected-Stream``).

    Why: building the headers dict and encoding it header by header was ~6 µs of the relay's ~28 µs
    CPU per event. The lines that depend only on (event type, aggregate type) and on the tenant are
    cached (bounded), like rendered subjects. Raises :class:`InvalidSubjectError` for a user header
    name NATS would refuse (an :class:`InvalidHeaderError`).

    With ``skip_trace_check``, a row whose headers carry a sampled W3C ``traceparent`` gets
    ``Nats-Trace-Dest: trace disabled`` as its first header. For such a message nats-server builds a
    map of every header before it looks at its account's trace settings (message tracing, ADR-41):
    ~2.5 µs of its CPU per message, measured (docs/benchmarks.md). 2.14+ reads that first header as
    "do not trace" and stops there. The row's own headers, ``traceparent`` included, go out unchanged.
    """

    _CACHE_LIMIT = 10_000

    def __init__(self, publisher: str, stream: str, skip_trace_check: bool = False) -> None:
        self._skip_trace_check = skip_trace_check
        self._publisher_line = f"{names.HDR_PUBLISHER}: {header_value(publisher)}\r\n"
        self._stream_line = f"{names.HDR_EXPECTED_STREAM}: {header_value(stream)}\r\n\r\n"
        self._types: dict[tuple[str, str], str] = {}
        self._tails: dict[str, str] = {}
        # user header name -> is it a traceparent (any case); only names that are valid, kept and
        # already stripped (the common case: one pass, no intermediate dict)
        self._plain: dict[str, bool] = {}

    def render(self, row: OutboxRow) -> bytes:
        types = self._types.get((row.event_type, row.aggregate_type))
        if types is None:
            types = (
                f"{names.HDR_EVENT_TYPE}: {header_value(row.event_type)}\r\n"
                f"{names.HDR_AGGREGATE_TYPE}: {header_value(row.aggregate_type)}\r\n"
            )
            if len(self._types) >= self._CACHE_LIMIT:
                self._types.clear()
            self._types[(row.event_type, row.aggregate_type)] = types
        tail = self._tails.get(row.tenant)
        if tail is None:
            tenant = f"{names.HDR_TENANT}: {header_value(row.tenant)}\r\n" if row.tenant else ""
            tail = self._publisher_line + tenant + self._stream_line
            if len(self._tails) >= self._CACHE_LIMIT:
                self._tails.clear()
            self._tails[row.tenant] = tail
        return (
            f"NATS/1.0\r\n{self._user_lines(row.headers) if row.headers else ''}"
            f"{names.HDR_MSG_ID}: {header_value(row.event_id)}\r\n{types}"
            f"{names.HDR_AGGREGATE_ID}: {header_value(row.aggregate_id)}\r\n{names.HDR_OUTBOX_ID}: {row.id}\r\n"
            f"{names.HDR_CREATED_AT}: {row.created_at}\r\n{tail}"
        ).encode()

    def _user_lines(self, headers: Mapping[str, str]) -> str:
        plain = self._plain
        lines: list[str] = []
        check, trace_off = self._skip_trace_check, False
        for key, v in headers.items():
            traceparent = plain.get(key)
            if traceparent is None:
                if not self._is_plain(key):  # names are stripped, dropped or refused first
                    return self._user_lines(_kept_headers(headers))
                traceparent = plain[key]
            value = v.strip()
            if "\r" in value or "\n" in value:
                value = value.replace("\r", " ").replace("\n", " ")
            if traceparent and check and not trace_off and sampled_traceparent(value):
                trace_off = True
                lines.insert(0, _TRACE_OFF_LINE)
            lines.append(f"{key}: {value}\r\n")
        return "".join(lines)

    def _is_plain(self, key: str) -> bool:
        """Whether ``key`` goes out as it is (valid, kept, nothing to strip); remembers it if so."""
        if key != key.strip() or not user_headers({key: ""}) or not HEADER_NAME.fullmatch(key):
            return False
        if len(self._plain) >= self._CACHE_LIMIT:
            self._plain.clear()
        self._plain[key] = key.lower() == "traceparent"
        return True


def _kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """:func:`user_headers`, every name checked: raises InvalidHeaderError for one NATS would refuse.
    Every name it returns is one :meth:`HeaderBlock._user_lines` sends as it is."""
    kept = user_headers(headers)
    for key in kept:
        if not HEADER_NAME.fullmatch(key):
            raise InvalidHeaderError(f"invalid header name {key!r}"[:200])
    return kept


_TRACE_OFF_LINE = f"{names.HDR_TRACE_DEST}: {names.TRACE_DEST_DISABLED}\r\n"


# The flags nats-server reads as sampled: strconv.ParseInt(flags, 16, 8) succeeds (two hex digits up
# to 7f, or a sign and one digit) and bit 0 is set. 80-ff overflow an int8 and read as not sampled.
_ODD_DIGITS = "13579bdfBDF"
_SAMPLED_FLAGS = frozenset([hi + lo for hi in "01234567" for lo in _ODD_DIGITS] + ["+" + lo for lo in _ODD_DIGITS])


def sampled_traceparent(value: str) -> bool:
    """Whether nats-server reads ``value`` as a sampled trace (its msgtrace.go, laxer than W3C's
    rule): four ``-``-separated fields, the last one two characters in :data:`_SAMPLED_FLAGS`."""
    return value[-3:-2] == "-" and value[-2:] in _SAMPLED_FLAGS and value.count("-") == 3


def subject_fields(row: OutboxRow) -> dict[str, str]:
    return {
        "aggregate_type": row.aggregate_type,
        "event_type": row.event_type,
        "tenant": row.tenant or "_",
        "aggregate_id": row.aggregate_id,
    }
