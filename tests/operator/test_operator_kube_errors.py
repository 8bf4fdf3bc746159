"""Every failed request to the API server is an ApiError: an error answer, an answer that is not
JSON (a load balancer's HTML 502 page), and no answer at all. The operator's handling of a failed
request (a pass the operator started asks for itself again; an Event is skipped) reads ApiError
only, so any other exception skipped that handling: a self-started pass then waited for the resync."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from kubernetes import client as k8s

from outbox_devkit.embedded import free_port
from outbox_operator import constants as c
from outbox_operator.kube import ApiError, Kube, apply_status_and_events, path_of
from outbox_operator.reconcile import Event, Plan
from outbox_operator.state import ClusterState


async def failed_get(url: str, path: str, timeout: float = 5.0) -> ApiError:
    """The ApiError a GET of ``path`` at ``url`` raises (a Kube of its own, closed again)."""
    configuration = k8s.Configuration()
    configuration.host = url
    kube = Kube(configuration, timeout=timeout)
    try:
        with pytest.raises(ApiError) as info:
            await kube.request("GET", path)
    finally:
        await kube.close()
    return info.value


@pytest.fixture
async def proxy() -> AsyncIterator[str]:
    """A stand-in for a proxy in front of the API server: HTML error pages, and a hanging answer."""

    async def bad_gateway(_request: web.Request) -> web.Response:
        return web.Response(
            status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
        )

    async def html_ok(_request: web.Request) -> web.Response:
        return web.Response(status=200, text="<html>login page</html>", content_type="text/html")

    async def hangs(_request: web.Request) -> web.Response:
        await asyncio.sleep(2)  # longer than the client waits; the server waits for it at cleanup
        return web.Response(status=200, text="{}")

    app = web.Application()
    app.router.add_get("/bad-gateway", bad_gateway)
    app.router.add_get("/html-ok", html_ok)
    app.router.add_get("/hangs", hangs)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_an_html_error_page_is_an_api_error_with_its_status(proxy: str) -> None:
    error = await failed_get(proxy, "/bad-gateway")
    assert error.status == 502
    assert "HTTP 502" in str(error)
    assert "502 Bad Gateway" in str(error)


async def test_a_success_that_is_not_json_is_an_api_error(proxy: str) -> None:
    error = await failed_get(proxy, "/html-ok")
    assert "an answer that is not JSON: <html>login page</html>" in str(error)


async def test_no_answer_is_an_api_error_of_status_0() -> None:
    error = await failed_get(f"http://127.0.0.1:{free_port()}", "/api/v1/namespaces")  # nothing listens there
    assert error.status == 0
    assert str(error).startswith("GET /api/v1/namespaces: no answer from the API server (ClientConnectorError)")


async def test_an_answer_slower_than_the_timeout_is_an_api_error_of_status_0(proxy: str) -> None:
    error = await failed_get(proxy, "/hangs", timeout=0.3)
    assert error.status == 0
    assert "no answer from the API server" in str(error)


async def test_after_an_event_gets_no_answer_the_passs_other_events_are_not_posted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pass posts its Events after the status patch; each waits up to the request timeout. While
    the API server does not answer, a pass waits for one Event, not for every one. An Event the
    server refuses (it answered) does not stop the next."""
    posted: list[str] = []

    async def status(_request: web.Request) -> web.Response:
        return web.json_response({"metadata": {"name": "orders", "resourceVersion": "2"}})

    async def event(request: web.Request) -> web.Response:
        reason = (await request.json())["reason"]
        posted.append(reason)
        if reason == "Refused":
            return web.json_response({"message": "invalid"}, status=422)
        if reason == "Unanswered":
            await asyncio.sleep(2)  # longer than the client waits
        return web.json_response({}, status=201)

    app = web.Application()
    app.router.add_patch(path_of(c.KIND, "shop", "orders", "status"), status)
    app.router.add_post(path_of("Event", "shop"), event)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    kube = Kube(configuration, timeout=0.3)
    body = {"metadata": {"name": "orders", "namespace": "shop", "uid": "u-1", "resourceVersion": "1"}}
    plan = Plan(
        status_patch={"phase": "Degraded"},
        events=[Event("Warning", r, "m") for r in ("Refused", "Unanswered", "Later", "Last")],
    )
    try:
        await apply_status_and_events(kube, ClusterState(), body, plan, datetime.now(UTC))
    finally:
        await kube.close()
        await runner.cleanup()
    assert posted == ["Refused", "Unanswered"]
    assert "events not posted (the API server did not answer): Later, Last" in caplog.text
