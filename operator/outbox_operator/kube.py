"""Kubernetes adapter: observe what a plan needs, and carry a plan out. The only module with I/O.

It speaks plain JSON over the official client's connection handling (kubeconfig, in-cluster
service-account token, TLS), one generic request function for every kind, so objects stay the
dicts the pure core builds. Calls are synchronous in the client, so each runs in a thread
(``asyncio.to_thread``) and never blocks kopf's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from . import constants as c
from .children import OperatorConfig, Owner, selector_string
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

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# kind -> (API path prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Secret": ("/api/v1", "secrets"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    c.KIND: (f"/apis/{c.GROUP}/{c.VERSION}", c.PLURAL),
}

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """An API server's error answer. Its text (logged, raised to kopf) has URL credentials removed:
    the server's message may quote a value the operator sent."""

    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, Mapping) else str(body)[:300]
        super().__init__(redact(f"{method} {path}: HTTP {status}: {message}", []))
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


def api_client_from_environment() -> k8s.ApiClient:
    return k8s.ApiClient(configuration_from_environment())


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


class Kube:
    """Generic JSON access to the API server."""

    def __init__(self, api: k8s.ApiClient, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout

    def _request_sync(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, payload, _ = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=payload, _request_timeout=self.timeout)
        raw = response.read()  # type: ignore[no-untyped-call]
        data: Any = json.loads(raw) if raw else None
        if response.status >= 400:
            raise ApiError(response.status, method, path, data)
        return data

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        return await asyncio.to_thread(self._request_sync, method, path, body, query, content_type)

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            result: Obj = await self.request("GET", path_of(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def list(self, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        data = await self.request("GET", path_of(kind, namespace), query=[("labelSelector", label_selector)])
        return list(data.get("items") or [])

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


async def observe(kube: Kube, body: Mapping[str, Any], now: datetime | None = None) -> Observed:
    owner = Owner.from_body(body)
    keys = child_keys(owner)
    found = await asyncio.gather(*(kube.get(kind, owner.namespace, name) for kind, name in keys))
    secret_keys: dict[str, set[str] | None] = {}
    versions: dict[str, str] = {}
    for name in secret_names(body):
        secret = await kube.get("Secret", owner.namespace, name)
        # only the key names and the resourceVersion are kept: values never leave this function (not
        # even as a digest, which would let a weak password be guessed offline from the pod template)
        if secret is None:
            secret_keys[name] = None
            continue
        secret_keys[name] = set((secret.get("data") or {}) | (secret.get("stringData") or {}))
        versions[name] = str(secret["metadata"].get("resourceVersion") or "")
    try:
        pods: list[str] | None = [
            p["metadata"]["name"] for p in await kube.list("Pod", owner.namespace, selector_string(owner))
        ]
    except ApiError as exc:
        log.warning("cannot list worker pods (status entries are not pruned): %s", exc)
        pods = None
    return Observed(
        body=body,
        children=dict(zip(keys, found, strict=True)),
        secrets=secret_keys,
        pods=pods,
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


async def apply_children(kube: Kube, namespace: str, actions: list[Action]) -> None:
    """Carry out child writes in order; the first one the API server refuses stops the rest."""
    for action in actions:
        try:
            await _apply_action(kube, namespace, action)
        except ApiError as exc:
            if exc.status in REJECTED_STATUSES:
                raise ChildRejected(action, exc) from None
            raise


async def apply_status_and_events(kube: Kube, body: Mapping[str, Any], result: Plan, now: datetime) -> None:
    owner = Owner.from_body(body)
    if result.status_patch:
        await kube.patch(c.KIND, owner.namespace, owner.name, {"status": result.status_patch}, "status")
    for event in result.events:
        try:
            await kube.create("Event", owner.namespace, event_body(body, event, now))
        except ApiError as exc:  # an Event is best effort
            log.warning("cannot post event %s: %s", event.reason, exc)


async def apply(kube: Kube, body: Mapping[str, Any], result: Plan, now: datetime) -> None:
    """Carry a plan out: children first, then the status, then the Events."""
    await apply_children(kube, Owner.from_body(body).namespace, result.actions)
    await apply_status_and_events(kube, body, result, now)


async def _apply_action(kube: Kube, namespace: str, action: Action) -> None:
    log.info("%s %s %s/%s", action.verb, action.kind, namespace, action.name)
    if action.verb == "create":
        assert action.body is not None
        try:
            await kube.create(action.kind, namespace, action.body)
        except ApiError as exc:
            if exc.status != 409:  # created meanwhile: the next pass compares it
                raise
    elif action.verb == "replace":
        assert action.body is not None
        await kube.replace(action.kind, namespace, action.name, action.body)
    elif action.verb == "patch":
        assert action.body is not None
        await kube.patch(action.kind, namespace, action.name, action.body)
    else:
        await kube.delete(action.kind, namespace, action.name)


async def reconcile(kube: Kube, body: Mapping[str, Any], config: OperatorConfig) -> Plan:
    """One level-based pass: observe, plan, apply. Returns the plan (for the caller's errors)."""
    observed = await observe(kube, body)
    result = plan(observed, config)
    try:
        await apply_children(kube, Owner.from_body(body).namespace, result.actions)
    except ChildRejected as rejected:
        result = plan_child_rejected(observed, rejected.action, rejected.api_message)
    await apply_status_and_events(kube, body, result, observed.now)
    return result
