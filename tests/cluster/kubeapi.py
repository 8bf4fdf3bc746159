"""A small async REST client for the test control plane (aiohttp; JSON in, JSON out).

Tests that run kopf in the same event loop must not block it, so this client is async. It knows
only the kinds the tests use (:data:`PLURALS`) and returns ``(status, body)``; helpers raise
:class:`ApiError` for unexpected statuses so a failure names the request.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp

Obj = dict[str, Any]

PLURALS = {
    "Namespace": "namespaces",
    "Node": "nodes",
    "Pod": "pods",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Event": "events",
    "Deployment": "deployments",
    "ReplicaSet": "replicasets",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Lease": "leases",
    "ResourceQuota": "resourcequotas",
    "OutboxPublisher": "outboxpublishers",
    "CustomResourceDefinition": "customresourcedefinitions",
}
CLUSTER_SCOPED = {"Namespace", "Node", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
API_VERSIONS = {
    "Deployment": "apps/v1",
    "ReplicaSet": "apps/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "Lease": "coordination.k8s.io/v1",
    "OutboxPublisher": "outbox.dev/v1alpha1",
    "CustomResourceDefinition": "apiextensions.k8s.io/v1",
}
REQUEST_TIMEOUT_S = 30.0


class ApiError(Exception):
    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body


def path_of(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """The REST path of a kind (collection when ``name`` is None)."""
    api_version = API_VERSIONS.get(kind, "v1")
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [prefix]
    if namespace is not None and kind not in CLUSTER_SCOPED:
        parts.append(f"namespaces/{namespace}")
    parts.append(PLURALS[kind])
    if name is not None:
        parts.append(name)
    if sub is not None:
        parts.append(sub)
    return "/".join(parts)


class KubeApi:
    """Async JSON client authenticated with a bearer token, verifying the server against ``ca_file``."""

    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        self.server = server
        self.token = token
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def with_token(self, token: str, ca_file: Path) -> KubeApi:
        return KubeApi(self.server, token, ca_file)

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", **params: str
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        async with self._session.request(
            method, self.server + path, json=body, headers=headers, params=params or None, ssl=self._ssl
        ) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = await response.text()
            return response.status, data

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        status, body = await self.request("GET", path_of(kind, namespace, name))
        if status == 404:
            return None
        if status != 200:
            raise ApiError("GET", path_of(kind, namespace, name), status, body)
        return dict(body)

    async def list(self, kind: str, namespace: str | None = None, **params: str) -> list[Obj]:
        path = path_of(kind, namespace)
        status, body = await self.request("GET", path, **params)
        if status != 200:
            raise ApiError("GET", path, status, body)
        return list(body.get("items") or [])

    async def create(self, obj: Obj, namespace: str | None = None) -> Obj:
        kind = obj["kind"]
        namespace = namespace or obj.get("metadata", {}).get("namespace")
        path = path_of(kind, namespace)
        status, body = await self.request("POST", path, obj)
        if status not in (200, 201):
            raise ApiError("POST", path, status, body)
        return dict(body)

    async def merge_patch(
        self, kind: str, namespace: str | None, name: str, patch: Obj, sub: str | None = None
    ) -> tuple[int, Any]:
        path = path_of(kind, namespace, name, sub)
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def delete(self, kind: str, namespace: str | None, name: str, **params: str) -> int:
        status, body = await self.request("DELETE", path_of(kind, namespace, name), **params)
        if status not in (200, 202, 404):
            raise ApiError("DELETE", path_of(kind, namespace, name), status, body)
        return status
