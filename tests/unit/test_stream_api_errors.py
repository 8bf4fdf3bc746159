"""Which JetStream API error answers the stream check asks again about (a cluster moving: bounded by
the start-up deadline, then "unavailable", exit 4) and which it reports at once (the server's or the
stream's configuration is wrong: exit 3). Errors built as nats-py builds them from the server's
answer (``APIError.from_error``), with nats-server's codes (server/errors.json)."""

from __future__ import annotations

import pytest
from nats.js import errors as js_errors

from outbox_worker.adapters.publisher import _api_reason, _passing


def answered(code: int, err_code: int, description: str) -> js_errors.APIError:
    try:
        js_errors.APIError.from_error({"code": code, "err_code": err_code, "description": description})
    except js_errors.APIError as exc:
        return exc
    raise AssertionError("from_error did not raise")


@pytest.mark.parametrize(
    ("code", "err_code", "description"),
    [
        (500, 10118, "stream is offline"),
        (503, 10008, "JetStream system temporarily unavailable"),
        (503, 10023, "insufficient resources"),
        (400, 10005, "no suitable peers for placement"),
        (500, 10009, "JetStream cluster can not handle request"),
        (500, 10051, "some general error"),
        (500, 19999, "an error this release does not know"),  # a server error: the deadline bounds it
    ],
)
def test_a_cluster_that_is_moving_is_asked_again(code: int, err_code: int, description: str) -> None:
    assert _passing(answered(code, err_code, description))


@pytest.mark.parametrize(
    ("code", "err_code", "description"),
    [
        (500, 10074, "replicas > 1 not supported in non-clustered mode"),
        (500, 10052, "stream configuration invalid"),
        (503, 10010, "JetStream clustering support required"),
        (500, 10047, "insufficient storage resources available"),
        (400, 10058, "stream name already in use with a different configuration"),
        (400, 10065, "subjects overlap with an existing stream"),
        (400, 19999, "a client error this release does not know"),
    ],
)
def test_a_wrong_configuration_is_refused(code: int, err_code: int, description: str) -> None:
    assert not _passing(answered(code, err_code, description))


def test_the_reason_names_the_servers_description_and_codes() -> None:
    reason = _api_reason(answered(500, 10118, "stream is offline"))
    assert reason == "stream is offline (code 500, err_code 10118)"
