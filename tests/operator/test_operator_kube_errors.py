"""Every failed request to the API server is an ApiError: an error answer, an answer that is not
JSON (a load balancer's HTML 502 page), and no answer at all. The operator's handling of a failed
request (a pass the operator started asks for itself again; an Event is skipped) reads ApiError
only, so any other exception skipped that handling: a self-started pass then waited for the resync."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from kubernetes import client as k8s

from outbox_devkit.embedded import free_port
from outbox_operator.kube import ApiError, Kube


def kube_at(url: str, timeout: float = 5.0) -> Kube:
    configuration = k8s.Configuration()
    configuration.host = url
    return Kube(configuration, timeout=timeout)


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
        import asyncio

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
    kube = kube_at(proxy)
    try:
        with pytest.raises(ApiError) as info:
            await kube.request("GET", "/bad-gateway")
    finally:
        await kube.close()
    assert info.value.status == 502
    assert "HTTP 502" in str(info.value)
    assert "502 Bad Gateway" in str(info.value)


async def test_a_success_that_is_not_json_is_an_api_error(proxy: str) -> None:
    kube = kube_at(proxy)
    try:
        with pytest.raises(ApiError) as info:
            await kube.request("GET", "/html-ok")
    finally:
        await kube.close()
    assert "an answer that is not JSON: <html>login page</html>" in str(info.value)


async def test_no_answer_is_an_api_error_of_status_0() -> None:
    kube = kube_at(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        with pytest.raises(ApiError) as info:
            await kube.request("GET", "/api/v1/namespaces")
    finally:
        await kube.close()
    assert info.value.status == 0
    assert str(info.value).startswith("GET /api/v1/namespaces: no answer from the API server (ClientConnectorError)")


async def test_an_answer_slower_than_the_timeout_is_an_api_error_of_status_0(proxy: str) -> None:
    kube = kube_at(proxy, timeout=0.3)
    try:
        with pytest.raises(ApiError) as info:
            await kube.request("GET", "/hangs")
    finally:
        await kube.close()
    assert info.value.status == 0
    assert "no answer from the API server" in str(info.value)
