"""Kubernetes adapter: observe what a plan needs, and carry a plan out. The only module with I/O.

Credentials come from the official client's configuration loaders (kubeconfig, in-cluster
service-account token, TLS); requests go out on one aiohttp session (the HTTP library kopf itself
runs on) in kopf's event loop: no thread per request, no blocking call. One generic request
function serves every kind, so objects stay the dicts the pure core builds. Every request is bounded
by ``Kube.timeout`` (30 s by default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from outbox_common.settings import redact_urls

from . import constants as c
from .children import OperatorConfig, Owner
from .conditions import rfc3339
from .reconcile import (
    Action,
    Event,
    Observed,
    Plan,
    child_keys,
    plan,
    plan_child_rejected,
    redact,
    secret_names,
)
from .state import ClusterState

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# kind -> (API path prefix, plural): what the operator writes (reads come from the watches, state.py)
RESOURCES: dict[str, tuple[str, str]] = {
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    c.KIND: (f"/apis/{c.GROUP}/{c.VERSION}", c.PLURAL),
}

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A failed request to the API server (:meth:`Kube.request`): an error answer, an answer that is
    not JSON, or no answer at all (``status`` 0). Its text (logged, raised to kopf) has URL
    credentials removed: the server's message may quote a value the operator sent."""

    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, Mapping) else str(body)[:300]
        answer = f"HTTP {status}: " if status else ""  # 0: no answer at all (see Kube.request)
        super().__init__(redact(f"{method} {path}: {answer}{message}", []))
        self.status = status
        self.body = body


def configuration_from_environment() -> k8s.Configuration:
    """In a pod: the service account; elsewhere: the kubeconfig ($KUBECONFIG or ~/.kube/config).

    $KUBECONFIG is read now, not when the client library was imported (the library's default is
    fixed at import time, which a long-lived process or a test suite would get wrong)."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration
        )
    return configuration


def credentials_problem() -> str | None:
    """Why this process has no credentials for the API server (not in a pod with a service account,
    and no usable kubeconfig), or None when it has some. For a one-line error at start-up: kopf would
    otherwise log the login's traceback and try again every 60 s, forever. The message names the
    kubeconfig path and the error's type, never the file's content."""
    try:
        configuration_from_environment()
    except Exception as exc:  # a missing file, a directory, YAML or a context the loader refuses
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        return (
            f"no Kubernetes API credentials: not in a pod with a service account, and no usable kubeconfig at "
            f"{path} ({type(exc).__name__}); set KUBECONFIG to a kubeconfig, or run the operator in a pod"
        )
    return None


class ApiServerUnreachable(Exception):
    """The API server gave no answer within the start-up timeout (:func:`wait_for_api_server`)."""


class CredentialsRefused(Exception):
    """The API server answered 401: it does not accept the operator's credentials (:func:`wait_for_api_server`)."""


HTTP_UNAUTHORIZED = 401


async def wait_for_api_server(configuration: k8s.Configuration, timeout: float) -> None:
    """Return once the API server answers (:meth:`Kube.unanswered`); until then try again, each
    failed try logged in one line, and after ``timeout`` seconds raise :class:`ApiServerUnreachable`
    with a one-line message naming the server, the last error and the fix. An answer of 401 raises
    :class:`CredentialsRefused` at once: kopf would end with "Ran out of valid credentials" and a
    screenful of tracebacks (exit 1), and waiting does not make a wrong token right.

    For start-up: kopf retries its first requests for about a minute and then ends with a screenful
    of tracebacks; this bounds the wait and says why in one line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    server = redact_urls(configuration.host)
    kube = Kube(configuration)
    delay = 0.5
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                # at least a second per try, so a timeout of 0 still tries once
                problem = await asyncio.wait_for(kube.unanswered(), max(deadline - loop.time(), 1.0))
            except TimeoutError:
                problem = "no answer in time"
            if problem is None:
                return
            if problem == f"HTTP {HTTP_UNAUTHORIZED}":
                raise CredentialsRefused(
                    f"the Kubernetes API server at {server} refused the operator's credentials (HTTP 401): the "
                    "token or client certificate of the kubeconfig (KUBECONFIG), or in a pod the service "
                    "account's token, is wrong or has expired"
                )
            left = deadline - loop.time()
            if left <= 0:
                raise ApiServerUnreachable(
                    f"the Kubernetes API server at {server} did not answer within {timeout:g} s ({problem}); check "
                    "that it runs and that the kubeconfig (KUBECONFIG) names the right server, or, in a pod, the "
                    "network to it; --startup-timeout-seconds sets how long start-up waits"
                )
            wait = min(delay, left)
            log.warning(
                "the Kubernetes API server at %s does not answer (try %d: %s); trying again in %.1f s, for %.1f s more",
                server,
                attempt,
                problem,
                wait,
                left,
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)
    finally:
        await kube.close()


def bearer_token(configuration: k8s.Configuration) -> str | None:
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    if not header:
        return None
    return str(header).split(" ", 1)[-1]


def path_of(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
    return path


def ssl_context_of(configuration: k8s.Configuration) -> ssl.SSLContext:
    """TLS as the configuration says: its CA (else the system's), its client certificate if any."""
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    return context


class Kube:
    """Generic JSON access to the API server on one aiohttp session (opened on first use, in the
    running loop; :meth:`close` ends it). Every request is bounded by ``timeout`` seconds."""

    def __init__(self, configuration: k8s.Configuration, timeout: float = 30.0) -> None:
        self.configuration = configuration
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context_of(self.configuration)),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": c.MANAGER},
            )
        return self._session

    def _auth_headers(self) -> dict[str, str]:
        """Bearer token (re-read each time: in a pod the projected token rotates) or basic auth."""
        if self.configuration.refresh_api_key_hook is not None:
            self.configuration.refresh_api_key_hook(self.configuration)
        token = bearer_token(self.configuration)
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self.configuration.username:
            return {"Authorization": str(self.configuration.get_basic_auth_token())}
        return {}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request; its JSON answer. Raises :class:`ApiError` for an error answer, one that is not
        JSON (a proxy's HTML 502 page: its first 300 characters are the message), and for no answer
        at all (refused, reset, timed out: status 0), so every caller's handling of a failed request
        (the pass asked for again, an Event skipped) covers each of them."""
        headers = {"Accept": "application/json", "Content-Type": content_type, **self._auth_headers()}
        payload = None if body is None else json.dumps(body)
        session = self._session_for_loop()
        try:
            async with session.request(
                method, self.configuration.host.rstrip("/") + path, data=payload, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(0, method, path, f"no answer from the API server ({type(exc).__name__})") from None
        try:
            data: Any = json.loads(raw) if raw else None
        except ValueError:
            text = raw.decode(errors="replace")
            message = text if status >= 400 else f"an answer that is not JSON: {text}"
            raise ApiError(status, method, path, message) from None
        if status >= 400:
            raise ApiError(status, method, path, data)
        return data

    async def unanswered(self) -> str | None:
        """Why the API server gives no answer to ``GET /version``, in one line (the error, a 5xx
        status, or ``HTTP 401`` for credentials it does not accept), or None when it answers. Any
        other answer below 500 counts (a 403 too: ``/version`` is public to every authenticated
        user, and what a refusal means is kopf's to report)."""
        url = self.configuration.host.rstrip("/") + "/version"
        try:
            async with self._session_for_loop().get(
                url, headers={"Accept": "application/json", **self._auth_headers()}
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = str(exc)
            return redact_urls(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)
        return f"HTTP {status}" if status >= 500 or status == HTTP_UNAUTHORIZED else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def create(self, kind: str, namespace: str, body: Obj) -> Obj:
        result: Obj = await self.request("POST", path_of(kind, namespace), body)
        return result

    async def replace(self, kind: str, namespace: str, name: str, body: Obj) -> Obj:
        result: Obj = await self.request("PUT", path_of(kind, namespace, name), body)
        return result

    async def patch(self, kind: str, namespace: str, name: str, patch: Obj, subresource: str | None = None) -> Obj:
        result: Obj = await self.request(
            "PATCH", path_of(kind, namespace, name, subresource), patch, content_type=MERGE_PATCH
        )
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", path_of(kind, namespace, name))
        except ApiError as exc:
            if exc.status != 404:
                raise


# --- observe and apply ----------------------------------------------------------------------------


def observe(state: ClusterState, body: Mapping[str, Any], now: datetime | None = None) -> Observed:
    """What a plan needs, read from the watch-fed state: no API request."""
    owner = Owner.from_body(body)
    keys = child_keys(owner)
    secret_keys: dict[str, set[str] | None] = {}
    versions: dict[str, str] = {}
    for name in secret_names(body):
        facts = state.secret(owner.namespace, name)
        secret_keys[name] = None if facts is None else set(facts.keys)
        if facts is not None:
            versions[name] = facts.resource_version
    return Observed(
        body=body,
        children={key: state.child(owner.namespace, *key) for key in keys},
        secrets=secret_keys,
        pods=state.pod_names(owner.namespace, owner.name),
        now=now or datetime.now(UTC),
        secret_versions=versions,
    )


def event_body(involved: Mapping[str, Any], event: Event, now: datetime) -> Obj:
    meta = involved["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": c.MANAGER},
        "reportingComponent": c.MANAGER,
        "reportingInstance": c.MANAGER,
        "firstTimestamp": rfc3339(now),
        "lastTimestamp": rfc3339(now),
        "count": 1,
    }


# Answers of the API server that mean "this object is invalid" (BadRequest, Invalid), not "try again".
REJECTED_STATUSES = frozenset({400, 422})


class ChildRejected(Exception):
    """The API server refused a child the plan wrote (invalid object, admission policy, quota)."""

    def __init__(self, action: Action, error: ApiError) -> None:
        super().__init__(f"{action.kind} {action.name} rejected: HTTP {error.status}")
        self.action = action
        self.api_message = str(error.body.get("message") if isinstance(error.body, Mapping) else error.body)[:1000]


async def apply_children(kube: Kube, state: ClusterState, namespace: str, actions: list[Action]) -> None:
    """Carry out child writes in order; the first one the API server refuses stops the rest. Each
    answer is kept in ``state.written`` until the watch shows it."""
    for action in actions:
        try:
            written = await _apply_action(kube, namespace, action)
            if written is not None or action.verb == "delete":
                state.written.put((namespace, action.kind, action.name), written)
        except ApiError as exc:
            if exc.status in REJECTED_STATUSES:
                raise ChildRejected(action, exc) from None
            raise


async def apply_status_and_events(
    kube: Kube, state: ClusterState, body: Mapping[str, Any], result: Plan, now: datetime
) -> None:
    """Patch the status (the answer is kept in ``state.written``), then post the Events.

    Events are best effort: one the API server refuses is logged and the next is posted. After one
    that got no answer (status 0: refused, reset or timed out) the rest of the pass's Events are
    logged, not posted, so a pass waits at most one request timeout for its Events, not one per
    Event, while the API server is away; the status they report is already written."""
    owner = Owner.from_body(body)
    if result.status_patch:
        patched = await kube.patch(c.KIND, owner.namespace, owner.name, {"status": result.status_patch}, "status")
        state.written.put((owner.namespace, c.KIND, owner.name), patched)
    for i, event in enumerate(result.events):
        try:
            await kube.create("Event", owner.namespace, event_body(body, event, now))
        except ApiError as exc:
            log.warning("cannot post event %s: %s", event.reason, exc)
            if exc.status == 0:
                skipped = [e.reason for e in result.events[i + 1 :]]
                if skipped:
                    log.warning("events not posted (the API server did not answer): %s", ", ".join(skipped))
                return


async def _apply_action(kube: Kube, namespace: str, action: Action) -> Obj | None:
    """One child write; returns the object as the API server answered (None after a delete, and
    after a create that found the object there already: the watch brings that one)."""
    log.info("%s %s %s/%s", action.verb, action.kind, namespace, action.name)
    if action.verb == "delete":
        await kube.delete(action.kind, namespace, action.name)
        return None
    assert action.body is not None
    if action.verb == "replace":
        return await kube.replace(action.kind, namespace, action.name, action.body)
    if action.verb == "patch":
        return await kube.patch(action.kind, namespace, action.name, action.body)
    try:
        return await kube.create(action.kind, namespace, action.body)
    except ApiError as exc:
        if exc.status != 409:  # created meanwhile: the next pass compares it
            raise
        return None


async def reconcile(kube: Kube, state: ClusterState, body: Mapping[str, Any], config: OperatorConfig) -> Plan:
    """One level-based pass: observe (from the watch-fed state), plan, apply. Only writes reach the
    API server. Returns the plan (for the caller's errors)."""
    observed = observe(state, body)
    result = plan(observed, config)
    try:
        await apply_children(kube, state, Owner.from_body(body).namespace, result.actions)
    except ChildRejected as rejected:
        result = plan_child_rejected(observed, rejected.action, rejected.api_message)
    await apply_status_and_events(kube, state, body, result, observed.now)
    return result
