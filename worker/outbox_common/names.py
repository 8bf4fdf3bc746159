"""Names shared by the worker, the operator, dashboards and consumers: headers, metrics, labels.

Change a name here and nowhere else.
"""

from __future__ import annotations

# --- NATS message headers set on every relayed event ---------------------------------------------
HDR_MSG_ID = "Nats-Msg-Id"  # = outbox event id; JetStream de-duplicates on it
HDR_EVENT_TYPE = "Outbox-Event-Type"
HDR_AGGREGATE_TYPE = "Outbox-Aggregate-Type"
HDR_AGGREGATE_ID = "Outbox-Aggregate-Id"
HDR_TENANT = "Outbox-Tenant"
HDR_CREATED_AT = "Outbox-Created-At"  # RFC 3339, from the row
HDR_OUTBOX_ID = "Outbox-Seq"  # the row's bigint id: per-aggregate order key
HDR_PUBLISHER = "Outbox-Publisher"
HDR_EXPECTED_STREAM = "Nats-Expected-Stream"  # set by the relay: the server refuses to store elsewhere
# Set by the relay ahead of a sampled `traceparent` row header unless nats_message_tracing is on:
# nats-server 2.14+ then skips its message-trace check (ADR-41) for that message.
HDR_TRACE_DEST = "Nats-Trace-Dest"
TRACE_DEST_DISABLED = "trace disabled"  # nats-server's own value for "do not trace"; not a subject
# User headers from the row's `headers` column (trace ids, correlation ids) are copied as they are,
# except that they may not override the headers above.
RESERVED_HEADERS = frozenset(
    {
        HDR_MSG_ID,
        HDR_EVENT_TYPE,
        HDR_AGGREGATE_TYPE,
        HDR_AGGREGATE_ID,
        HDR_TENANT,
        HDR_CREATED_AT,
        HDR_OUTBOX_ID,
        HDR_PUBLISHER,
    }
)

# --- Prometheus metrics ---------------------------------------------------------------------------
METRIC_PREFIX = "outbox_"
M_PUBLISHED = METRIC_PREFIX + "published_total"  # counter
M_DUPLICATES = METRIC_PREFIX + "duplicates_total"  # counter (acked as duplicate: success)
M_FAILED = METRIC_PREFIX + "publish_failures_total"  # counter, label reason
M_DEAD_LETTERS = METRIC_PREFIX + "dead_letters_total"  # counter, label reason
M_IN_FLIGHT = METRIC_PREFIX + "in_flight"  # gauge
M_ACK_LATENCY = METRIC_PREFIX + "ack_latency_seconds"  # histogram, publish -> ack
M_BATCH_LATENCY = METRIC_PREFIX + "batch_seconds"  # histogram, claim -> mark
M_BACKLOG = METRIC_PREFIX + "backlog_rows"  # gauge, pending rows of owned partitions
M_OLDEST_AGE = METRIC_PREFIX + "oldest_pending_age_seconds"  # gauge
M_DEAD_LETTERS_WAITING = METRIC_PREFIX + "dead_letters_waiting"  # gauge, the publisher's rows in the dead-letter table
M_PARTITIONS = METRIC_PREFIX + "partitions_owned"  # gauge
M_NOTIFY_UNAVAILABLE = METRIC_PREFIX + "notify_unavailable"  # gauge, 1 while NOTIFYs do not reach the worker
M_DATABASE_UNAVAILABLE = METRIC_PREFIX + "database_unavailable"  # gauge, 1 while the database has not answered for 10 s
M_HANDOVERS = METRIC_PREFIX + "lease_handovers_total"  # counter, label kind (acquired|released|lost)
M_CONFIG_ERRORS = METRIC_PREFIX + "config_errors_total"  # counter, label reason
M_CPU_SECONDS = METRIC_PREFIX + "cpu_seconds_total"  # counter, the worker process's user + system CPU
M_RESIDENT_MEMORY = METRIC_PREFIX + "resident_memory_bytes"  # gauge, the worker process's RSS

LABEL_PUBLISHER = "publisher"
LABEL_REASON = "reason"
LABEL_KIND = "kind"

# --- Failure reasons (metric label values, status fields, the prefix of last_error and of a dead
# letter's `reason`: "<reason>: <detail>"). README "Dead letters" lists them; keep the two in step.
# Retryable (never a dead letter): the publish may succeed if tried again.
REASON_TIMEOUT = "timeout"  # no ack within ack_timeout_seconds
REASON_DISCONNECT = "disconnect"  # the connection to NATS was lost with the publish in flight
REASON_NO_RESPONDERS = "no_responders"  # 503 no responders: the stream's leader is not there right now
REASON_SERVER_ERROR = "server_error"  # an error ack retrying can fix: 5xx, 409, 429, stream full
# Configuration (never a dead letter): the partition pauses until the stream is set up right.
REASON_NO_STREAM = "no_stream"
REASON_NOT_PERMITTED = "not_permitted"  # the NATS user may not publish to the subject (server permissions)
# The row can never be published as it is: dead-lettered (see DEAD_LETTER_REASONS).
REASON_INVALID_SUBJECT = "invalid_subject"  # a subject token empty or too long, or the subject too long
REASON_INVALID_HEADER = "invalid_header"  # a row header name NATS refuses
REASON_INVALID_CREATED_AT = "invalid_created_at"  # created_at has no RFC 3339 form (BC, infinity)
REASON_HEADER_TOO_LARGE = "header_too_large"  # the header block is over nats-server's 64 KiB limit
REASON_PAYLOAD_TOO_LARGE = "payload_too_large"  # headers + payload over max_payload or the stream's limit
REASON_SERVER_REJECTED = "server_rejected"  # any other error ack the server gives for this message alone

DEAD_LETTER_REASONS = (
    REASON_INVALID_SUBJECT,
    REASON_INVALID_HEADER,
    REASON_INVALID_CREATED_AT,
    REASON_HEADER_TOO_LARGE,
    REASON_PAYLOAD_TOO_LARGE,
    REASON_SERVER_REJECTED,
)

# nats-server refuses to store a message whose header block is longer than this (its
# JSStreamHeaderExceedsMaximumErr, 400/10097 "header size exceeds maximum allowed of 64k").
MAX_HEADER_BYTES = 65535


def reason_of(text: str) -> str:
    """The reason prefix of a ``last_error`` or dead-letter ``reason`` (``"header_too_large: …"``)."""
    return text.split(":", 1)[0].strip()
