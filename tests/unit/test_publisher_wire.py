"""The publisher writes HPUB frames itself (adapters/publisher.py, ``encode_hpub``) instead of calling
nats-py's ``Client.publish`` per message. These tests pin that it writes exactly the bytes nats-py
would, rejects what nats-py would reject, and that the private nats-py methods it uses still exist."""

from __future__ import annotations

import inspect

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client

from outbox_worker.adapters.publisher import InvalidMessageError, encode_hpub

HEADER_SETS = [
    {},
    {"Nats-Msg-Id": "0b6e2f0c-1c1e-4a43-9d3e-6a4f0e0f9a11", "Outbox-Seq": "42"},
    {"traceparent": "00-abc-def-01", "Outbox-Aggregate-Id": "  padded value  "},
    {"Outbox-Event-Type": "line\r\nbreak\ninside", "X-Unicode": "grüße ✓"},
    {" spaced-key ": "v", "": "empty key is skipped", "   ": "so is blank"},
    {"X-Empty": "", "X-Tab": "\tx\t"},
]


async def _nats_py_frame(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    client = Client()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    client._flush_queue = None
    await client._send_publish(subject, reply, payload, len(payload), headers)
    assert len(sent) == 1
    return sent[0]


@pytest.mark.parametrize("headers", HEADER_SETS)
@pytest.mark.parametrize("payload", [b"", b'{"a": 1}', bytes(range(256))])
async def test_frame_is_byte_for_byte_what_nats_py_writes(headers: dict[str, str], payload: bytes) -> None:
    subject, reply = "outbox.order.created", "_INBOX.abcdef.17"
    ours, size = encode_hpub(subject, reply, headers, payload)
    assert ours == await _nats_py_frame(subject, reply, headers, payload)
    hdr_len = int(ours.split(b"\r\n", 1)[0].split()[3])
    assert size == hdr_len + len(payload)


@pytest.mark.parametrize("subject", ["", "a b", "a\r\nPUB x 1", "tab\there"])
def test_subjects_nats_py_refuses_are_refused(subject: str) -> None:
    with pytest.raises(InvalidMessageError):
        encode_hpub(subject, "_INBOX.x.1", {}, b"")


@pytest.mark.parametrize("name", ["bad name", "colon:", "ü", "new\nline"])
async def test_header_names_nats_py_refuses_are_refused(name: str) -> None:
    with pytest.raises(InvalidMessageError):
        encode_hpub("a.b", "_INBOX.x.1", {name: "v"}, b"")
    with pytest.raises(nats_errors.BadHeaderError):
        await _nats_py_frame("a.b", "_INBOX.x.1", {name: "v"}, b"")


def test_private_nats_py_api_used_by_the_publisher_exists() -> None:
    assert list(inspect.signature(Client._send_command).parameters)[:2] == ["self", "cmd"]
    assert inspect.iscoroutinefunction(Client._send_command)
    assert inspect.iscoroutinefunction(Client._flush_pending)
    assert isinstance(Client.is_draining_pubs, property)
