"""Watch-fed state: what a reconcile reads, kept current by kopf's watches instead of API reads.

kopf indexes (``kopf.index`` handlers registered in handlers.py) hold, per watched namespace:

* every child the operator owns (label ``app.kubernetes.io/managed-by=outbox-operator``, selected
  by the API server), by kind and name;
* the worker Pods (labels ``app.kubernetes.io/component=worker`` and ``outbox.dev/publisher``, the
  Deployment's selector: ``handlers.WORKER_POD_SELECTOR``), by publisher: their names only;
* every Secret: its key names and resourceVersion only. Values are never kept (not even hashed).

kopf fills the indexes from its initial LISTs before it calls any handler, so the first reconcile
after a start already sees every child and Secret. Objects the operator has just written are kept
in :class:`Written` until their own watch event arrives (or ``WRITTEN_TTL_SECONDS`` pass), so a pass
that runs in between sees the write and does not repeat it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import constants as c

Obj = dict[str, Any]

# kind -> (apiVersion as kopf takes it, plural): the children the operator owns
CHILD_RESOURCES: dict[str, tuple[str, str]] = {
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Service": ("v1", "services"),
    "Deployment": ("apps/v1", "deployments"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
}

# A write's own watch event normally arrives within milliseconds; after this long the watch is
# trusted again even if that event was missed (a watch restart can skip it).
WRITTEN_TTL_SECONDS = 30.0

# An index: key -> the values of every object indexed under that key (kopf.Index's shape).
Index = Mapping[Any, Collection[Any]]
ChildKey = tuple[str, str, str]  # (namespace, kind, name)


@dataclass(frozen=True)
class SecretFacts:
    """What the operator knows of a Secret: its key names and resourceVersion, never a value."""

    keys: frozenset[str]
    resource_version: str


def secret_facts(body: Mapping[str, Any]) -> SecretFacts:
    keys = set(body.get("data") or {}) | set(body.get("stringData") or {})
    return SecretFacts(frozenset(keys), str((body.get("metadata") or {}).get("resourceVersion") or ""))


def slim(body: Mapping[str, Any]) -> Obj:
    """A child as the plan reads it: everything but managedFields (large, never read)."""
    obj = dict(body)
    obj["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return obj


def resource_version(obj: Mapping[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


# How many recent resourceVersions of each object the watch is remembered to have shown: a write's
# answer can be handled after its own watch event (the two race), and must then not be kept.
RECENT_VERSIONS = 32


@dataclass
class Written:
    """Objects the operator wrote whose watch event has not arrived yet: newer than the index."""

    ttl: float = WRITTEN_TTL_SECONDS
    _items: dict[Any, tuple[Obj | None, float]] = field(default_factory=dict)
    _recent: dict[Any, deque[str]] = field(default_factory=dict)

    def put(self, key: Any, obj: Obj | None) -> None:
        """Remember a write's answer (None: the object was deleted), unless the watch showed it
        already."""
        if obj is not None and resource_version(obj) in self._recent.get(key, ()):
            return
        self._items[key] = (obj, time.monotonic() + self.ttl)

    def lookup(self, key: Any) -> tuple[bool, Obj | None]:
        """(True, object) while a write is newer than the watch; (False, None) otherwise."""
        item = self._items.get(key)
        if item is None:
            return False, None
        if time.monotonic() > item[1]:
            del self._items[key]
            return False, None
        return True, item[0]

    def seen(self, key: Any, body: Mapping[str, Any] | None) -> bool:
        """The watch delivered ``body`` (None: a deletion): drop the write it confirms. True when
        the event is the echo of the operator's own write (nothing new to act on)."""
        if body is None:
            self._recent.pop(key, None)
        else:
            self._recent.setdefault(key, deque(maxlen=RECENT_VERSIONS)).append(resource_version(body))
        item = self._items.get(key)
        if item is None:
            return False
        written = item[0]
        echo = body is not None and written is not None and resource_version(body) == resource_version(written)
        if echo or body is None or written is None:
            del self._items[key]
        return echo


def plan_inputs(child: Mapping[str, Any]) -> tuple[Any, ...]:
    """The fields of a child the plan reads: its rendered hash, owner, replicas and rollout (a
    Deployment's pods of the current template, and whether its controller saw its latest spec)."""
    meta = child.get("metadata") or {}
    status = child.get("status") or {}
    return (
        (meta.get("annotations") or {}).get(c.ANNOTATION_HASH),
        tuple(str(ref.get("uid")) for ref in meta.get("ownerReferences") or []),
        (child.get("spec") or {}).get("replicas"),
        status.get("replicas"),
        status.get("readyReplicas"),
        status.get("updatedReplicas"),
        meta.get("generation"),
        status.get("observedGeneration"),
    )


@dataclass
class ClusterState:
    """The indexes kopf keeps (set at start-up) and the operator's own unconfirmed writes."""

    children: dict[str, Index] = field(default_factory=dict)  # kind -> (namespace, name) -> [child]
    secrets: Index | None = None  # (namespace, name) -> [SecretFacts]
    pods: Index | None = None  # (namespace, publisher name) -> [pod name]
    written: Written = field(default_factory=Written)

    def child(self, namespace: str, kind: str, name: str) -> Obj | None:
        pending, obj = self.written.lookup((namespace, kind, name))
        if pending:
            return obj
        found = list(self.children[kind].get((namespace, name)) or ())
        return dict(found[0]) if found else None

    def secret(self, namespace: str, name: str) -> SecretFacts | None:
        assert self.secrets is not None
        found = list(self.secrets.get((namespace, name)) or ())
        return found[0] if found else None

    def pod_names(self, namespace: str, publisher: str) -> list[str]:
        assert self.pods is not None
        return sorted(self.pods.get((namespace, publisher)) or ())
