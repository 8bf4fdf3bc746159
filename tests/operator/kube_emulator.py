"""A small stateful Kubernetes API server emulator (aiohttp) for operator tests.

Why our own and not kmock 0.8: kmock stores objects but sets no uid/resourceVersion/generation,
ignores selectors and watch timeouts, has no status/scale subresource semantics, no PUT, answers
200 on create; closing those gaps is a subclass about as long as this file, and this file states
the behaviour the operator relies on in one place, with nothing hidden in a dependency.

What it does, as the real API server does where kopf and the Kubernetes client need it:

* discovery (/api, /apis, /api/v1, /apis/G/V) for the built-in kinds the operator uses and for
  every CRD created through it (CRDs are objects: applying crds/outboxpublisher.yaml registers the
  kind, with its subresources, defaulting, pruning and validation including CEL);
* create (201, 409 AlreadyExists, generateName), get (404), list with label and field selectors,
  replace (PUT, 409 on a stale resourceVersion), merge patch (strategic merge is treated as merge),
  JSON patch (422 when its test fails),
  delete (finalizers hold it with a deletionTimestamp; dependents are garbage-collected through
  ownerReferences), 422 Invalid for schema and CEL violations;
* uid, resourceVersion (one global counter), generation (bumped on spec changes only),
  creationTimestamp; the status subresource (main-resource writes ignore status and vice versa);
  the scale subresource of custom resources (autoscaling/v1 Scale);
* watches from a resourceVersion, with ``timeoutSeconds``, bookmarks, label/field selectors, and
  410 Gone for versions older than the retained history;
* an optional "deployment controller" that marks every Deployment's replicas ready at once.

It records every request in ``requests`` so tests can assert that a pass wrote nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import crd_schema
import jsonpatch
import jsonpointer
from aiohttp import web

Obj = dict[str, Any]


@dataclass
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    status: bool = False  # has a status subresource
    scale: dict[str, str] | None = None  # scale subresource paths
    schema: Obj | None = None  # openAPIV3Schema of a custom resource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


BUILTINS = [
    Kind("", "v1", "namespaces", "Namespace", namespaced=False),
    Kind("", "v1", "pods", "Pod", status=True),
    Kind("", "v1", "secrets", "Secret"),
    Kind("", "v1", "configmaps", "ConfigMap"),
    Kind("", "v1", "services", "Service", status=True),
    Kind("", "v1", "serviceaccounts", "ServiceAccount"),
    Kind("", "v1", "events", "Event"),
    Kind("apps", "v1", "deployments", "Deployment", status=True),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", status=True),
    Kind("events.k8s.io", "v1", "events", "Event"),
    Kind(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        status=True,
    ),
    Kind("coordination.k8s.io", "v1", "leases", "Lease"),
]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


# --- selectors --------------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def _label_test(term: str) -> Callable[[dict[str, str]], bool]:
    m = _SET_RE.match(term)
    if m:
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
        return lambda lb: (lb.get(key) in values) == (op == "in")
    if "!=" in term:
        key, value = (x.strip() for x in term.split("!=", 1))
        return lambda lb: lb.get(key) != value
    if "=" in term:
        key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
        return lambda lb: lb.get(key) == value
    if term.startswith("!"):
        missing = term[1:].strip()
        return lambda lb: missing not in lb
    return lambda lb: term in lb


def label_matcher(text: str | None) -> Callable[[dict[str, str]], bool]:
    tests = [_label_test(term.strip()) for term in _split_selector(text or "")]
    return lambda labels: all(t(labels) for t in tests)


def _field_test(term: str) -> Callable[[Obj], bool]:
    negate = "!=" in term
    key, value = (x.strip() for x in term.replace("!=", "=").replace("==", "=").split("=", 1))
    path = key.split(".")

    def test(obj: Obj) -> bool:
        cur: Any = obj
        for part in path:
            cur = cur.get(part) if isinstance(cur, dict) else None
        return (str(cur if cur is not None else "") == value) != negate

    return test


def field_matcher(text: str | None) -> Callable[[Obj], bool]:
    tests = [_field_test(term) for term in (text or "").split(",") if term.strip()]
    return lambda obj: all(t(obj) for t in tests)


# --- the emulator -------------------------------------------------------------------------------------


class ApiFailure(Exception):
    def __init__(self, code: int, reason: str, message: str, causes: list[str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.causes = code, reason, message, causes or []

    def response(self) -> web.Response:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.causes:
            body["details"] = {"causes": [{"message": c} for c in self.causes]}
        return web.json_response(body, status=self.code)


@dataclass
class Watcher:
    kind: Kind
    namespace: str | None
    labels: Callable[[dict[str, str]], bool]
    fields: Callable[[Obj], bool]
    queue: asyncio.Queue[tuple[str, Obj] | None]


@dataclass
class Request:
    method: str
    path: str
    content_type: str
    body: Any
    query: dict[str, str] = field(default_factory=dict)


_QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _pod_spec_errors(pod: Obj, at: str) -> list[str]:
    """A few of the API server's own checks of a pod spec, with its wording (enough to test how the
    operator handles a refused child; the real list is much longer)."""
    errors = []
    for i, tol in enumerate(pod.get("tolerations") or []):
        if tol.get("operator", "Equal") not in ("Equal", "Exists"):
            errors.append(
                f'{at}.tolerations[{i}].operator: Unsupported value: "{tol["operator"]}": '
                'supported values: "Equal", "Exists"'
            )
    node_affinity = (pod.get("affinity") or {}).get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for t, term in enumerate(required.get("nodeSelectorTerms") or []):
        for m, expr in enumerate(term.get("matchExpressions") or []):
            if expr.get("operator") not in ("DoesNotExist", "Exists", "Gt", "In", "Lt", "NotIn"):
                errors.append(
                    f"{at}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                    f".nodeSelectorTerms[{t}].matchExpressions[{m}].operator: "
                    f'Unsupported value: "{expr.get("operator")}": '
                    'supported values: "DoesNotExist", "Exists", "Gt", "In", "Lt", "NotIn"'
                )
    for c, container in enumerate(pod.get("containers") or []):
        where = f"{at}.containers[{c}]"
        for kind in ("requests", "limits"):
            for name, quantity in ((container.get("resources") or {}).get(kind) or {}).items():
                if isinstance(quantity, str) and not _QUANTITY.match(quantity):
                    errors.append(
                        f'{where}.resources.{kind}[{name}]: Invalid value: "{quantity}": quantities must match '
                        "the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
                    )
        for e, env in enumerate(container.get("env") or []):
            if env.get("value") and env.get("valueFrom"):
                errors.append(
                    f'{where}.env[{e}].valueFrom: Invalid value: "": may not be specified when `value` is not empty'
                )
    return errors


def validate_builtin(k: Kind, obj: Obj) -> None:
    """Refuse an invalid Deployment with 422 Invalid, as the API server does."""
    if k.kind != "Deployment":
        return
    template = (obj.get("spec") or {}).get("template") or {}
    errors = _pod_spec_errors(template.get("spec") or {}, "spec.template.spec")
    if errors:
        name = obj["metadata"]["name"]
        detail = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        raise ApiFailure(422, "Invalid", f'Deployment.apps "{name}" is invalid: {detail}')


class KubeEmulator:
    HISTORY = 5000  # watch events kept for resuming watches

    def __init__(self, *, auto_ready_deployments: bool = True) -> None:
        self.kinds: dict[tuple[str, str, str], Kind] = {(k.group, k.version, k.plural): k for k in BUILTINS}
        self.objects: dict[tuple[str, str, str], dict[tuple[str, str], Obj]] = {k: {} for k in self.kinds}
        self.rv = itertools.count(100)
        self.last_rv = 100
        self.history: list[tuple[int, tuple[str, str, str], str, Obj]] = []
        self.watchers: list[Watcher] = []
        self.requests: list[Request] = []
        # (method, path substring, seconds): matching requests are answered that much later, like a
        # busy API server (tests of what the operator does while one of its calls is in flight)
        self.delays: list[tuple[str, str, float]] = []
        self.auto_ready_deployments = auto_ready_deployments
        self.lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.stopping = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sock = server.sockets[0]  # type: ignore[attr-defined]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        self.stopping.set()
        for w in self.watchers:
            w.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
            ],
        }
        path.write_text(json.dumps(config))
        return path

    # --- direct access for tests (no HTTP) -------------------------------------------------------------

    def kind_of(self, api_version: str, kind: str) -> Kind:
        group, _, version = api_version.rpartition("/")
        for k in self.kinds.values():
            if k.group == group and k.version == version and k.kind == kind:
                return k
        raise KeyError(f"{api_version} {kind}")

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        k = self.kind_of(api_version, kind)
        found = self.objects[(k.group, k.version, k.plural)].get((namespace if k.namespaced else "", name))
        return copy.deepcopy(found) if found else None

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[Obj]:
        k = self.kind_of(api_version, kind)
        return [
            copy.deepcopy(o)
            for (ns, _), o in sorted(self.objects[(k.group, k.version, k.plural)].items())
            if namespace is None or ns == namespace
        ]

    async def apply(self, obj: Obj) -> Obj:
        """Create, or replace keeping the stored resourceVersion (like kubectl apply, roughly)."""
        k = self.kind_of(obj["apiVersion"], obj["kind"])
        ns = obj["metadata"].get("namespace", "default") if k.namespaced else ""
        async with self.lock:
            existing = self.objects[(k.group, k.version, k.plural)].get((ns, obj["metadata"]["name"]))
            if existing is None:
                return self._create(k, ns, copy.deepcopy(obj))
            body = copy.deepcopy(obj)
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            return self._replace(k, ns, obj["metadata"]["name"], body, None)

    async def patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: Obj, subresource: str | None = None
    ) -> Obj:
        k = self.kind_of(api_version, kind)
        async with self.lock:
            return self._patch(k, namespace if k.namespaced else "", name, patch, subresource)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        k = self.kind_of(api_version, kind)
        async with self.lock:
            self._delete(k, namespace if k.namespaced else "", name)

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]

    # --- storage primitives (call with the lock held) ---------------------------------------------------

    def _store(self, k: Kind) -> dict[tuple[str, str], Obj]:
        return self.objects[(k.group, k.version, k.plural)]

    def _bump(self, obj: Obj) -> int:
        rv = next(self.rv) + 1
        self.last_rv = rv
        obj["metadata"]["resourceVersion"] = str(rv)
        return rv

    def _notify(self, k: Kind, event: str, obj: Obj, rv: int) -> None:
        key = (k.group, k.version, k.plural)
        self.history.append((rv, key, event, copy.deepcopy(obj)))
        del self.history[: -self.HISTORY]
        for w in self.watchers:
            if w.kind is k and self._matches(w, obj):
                w.queue.put_nowait((event, copy.deepcopy(obj)))

    @staticmethod
    def _matches(w: Watcher, obj: Obj) -> bool:
        meta = obj["metadata"]
        return (
            (w.namespace is None or meta.get("namespace") == w.namespace)
            and w.labels(meta.get("labels") or {})
            and w.fields(obj)
        )

    def _admit(self, k: Kind, obj: Obj, old: Obj | None) -> Obj:
        if k.schema is None:
            return obj
        stored, errors = crd_schema.admit(k.schema, obj, old)
        if errors:
            raise ApiFailure(
                422, "Invalid", f'{k.kind} "{obj["metadata"].get("name")}" is invalid: ' + "; ".join(errors), errors
            )
        return stored

    def _create(self, k: Kind, ns: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiFailure(422, "Invalid", "metadata.name: Required value")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if k.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if (ns, meta["name"]) in self._store(k):
            raise ApiFailure(409, "AlreadyExists", f'{k.plural} "{meta["name"]}" already exists')
        obj["apiVersion"], obj["kind"] = k.api_version, k.kind
        if k.status:
            obj.pop("status", None)
        obj = self._admit(k, obj, None)
        validate_builtin(k, obj)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
        for transient in ("resourceVersion", "deletionTimestamp"):
            meta.pop(transient, None)
        rv = self._bump(obj)
        self._store(k)[(ns, meta["name"])] = obj
        if k.kind == "CustomResourceDefinition":
            self._register_crd(obj)
        self._notify(k, "ADDED", obj, rv)
        self._controllers(k, obj)
        return copy.deepcopy(obj)

    def _existing(self, k: Kind, ns: str, name: str) -> Obj:
        obj = self._store(k).get((ns, name))
        if obj is None:
            raise ApiFailure(404, "NotFound", f'{k.plural}.{k.group or "core"} "{name}" not found')
        return obj

    def _save(self, k: Kind, ns: str, old: Obj, new: Obj, subresource: str | None) -> Obj:
        """Store ``new`` in place of ``old`` with the rules of the (sub)resource written."""
        if subresource == "status":
            merged = copy.deepcopy(old)
            merged["status"] = new.get("status")
            if merged["status"] is None:
                merged.pop("status")
            new = merged
        else:
            if k.status:
                new["status"] = copy.deepcopy(old.get("status"))
                if new["status"] is None:
                    new.pop("status")
            meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
            for fixed in ("uid", "creationTimestamp", "name", "namespace", "generation", "deletionTimestamp"):
                if fixed in old_meta:
                    meta[fixed] = old_meta[fixed]
                else:
                    meta.pop(fixed, None)
            new["apiVersion"], new["kind"] = k.api_version, k.kind
        if k.schema is not None:
            new = self._admit(k, new, old)
        validate_builtin(k, new)
        content = {key: v for key, v in new.items() if key not in ("metadata", "status")}
        old_content = {key: v for key, v in old.items() if key not in ("metadata", "status")}
        if content != old_content:
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)  # a no-op write does not change the resourceVersion
        if old["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._store(k).pop((ns, new["metadata"]["name"]), None)
            rv = self._bump(new)
            self._notify(k, "DELETED", new, rv)
            self._collect_garbage(new["metadata"]["uid"])
            return copy.deepcopy(new)
        rv = self._bump(new)
        self._store(k)[(ns, new["metadata"]["name"])] = new
        if k.kind == "CustomResourceDefinition":  # an updated CRD's schema applies to later writes
            self._register_crd(new)
        self._notify(k, "MODIFIED", new, rv)
        self._controllers(k, new)
        return copy.deepcopy(new)

    def _replace(self, k: Kind, ns: str, name: str, body: Obj, subresource: str | None) -> Obj:
        old = self._existing(k, ns, name)
        wanted_rv = body.get("metadata", {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiFailure(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {k.plural} "{name}": '
                "the object has been modified; please apply your changes to the latest version",
            )
        return self._save(k, ns, old, copy.deepcopy(body), subresource)

    def _patch(self, k: Kind, ns: str, name: str, patch: Any, subresource: str | None) -> Obj:
        old = self._existing(k, ns, name)
        if not isinstance(patch, dict):
            raise ApiFailure(415, "UnsupportedMediaType", "only merge patches are supported here")
        wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiFailure(409, "Conflict", f'Operation cannot be fulfilled on {k.plural} "{name}"')
        new = merge(copy.deepcopy(old), patch)
        if subresource != "status":
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._save(k, ns, old, new, subresource)

    def _json_patch(self, k: Kind, ns: str, name: str, ops: Any, subresource: str | None) -> Obj:
        """RFC 6902 (kopf uses it for finalizers, guarded by a test of the resourceVersion)."""
        old = self._existing(k, ns, name)
        try:
            new = jsonpatch.apply_patch(copy.deepcopy(old), ops)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise ApiFailure(422, "Invalid", f"the test of the JSON patch failed: {exc}") from exc
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise ApiFailure(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
        return self._save(k, ns, old, new, subresource)

    def _delete(self, k: Kind, ns: str, name: str) -> Obj:
        obj = self._existing(k, ns, name)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                rv = self._bump(obj)
                self._notify(k, "MODIFIED", obj, rv)
            return copy.deepcopy(obj)
        self._store(k).pop((ns, name))
        rv = self._bump(obj)
        self._notify(k, "DELETED", obj, rv)
        self._collect_garbage(obj["metadata"]["uid"])
        return copy.deepcopy(obj)

    def _collect_garbage(self, owner_uid: str) -> None:
        for k in list(self.kinds.values()):
            for (ns, name), obj in list(self._store(k).items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs):
                    with contextlib.suppress(ApiFailure):
                        self._delete(k, ns, name)

    def _register_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            subresources = version.get("subresources") or {}
            k = Kind(
                spec["group"],
                version["name"],
                spec["names"]["plural"],
                spec["names"]["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=spec["names"].get("singular", ""),
                short_names=spec["names"].get("shortNames", []),
                status="status" in subresources,
                scale=subresources.get("scale"),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            )
            key = (k.group, k.version, k.plural)
            self.kinds[key] = k
            self.objects.setdefault(key, {})

    def _controllers(self, k: Kind, obj: Obj) -> None:
        """The one built-in controller emulated: Deployments become ready at once (optional)."""
        if not (self.auto_ready_deployments and k.kind == "Deployment" and k.group == "apps"):
            return
        replicas = int(obj.get("spec", {}).get("replicas", 1))
        status = {
            "observedGeneration": obj["metadata"]["generation"],
            "replicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "updatedReplicas": replicas,
        }
        if obj.get("status") != status:
            old = copy.deepcopy(obj)
            new = copy.deepcopy(obj)
            new["status"] = status
            self._save(k, obj["metadata"].get("namespace", ""), old, new, "status")

    # --- HTTP ----------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        self.requests.append(Request(request.method, request.path, request.content_type, body, dict(request.query)))
        for method, part, seconds in self.delays:
            if request.method == method and part in request.path:
                await asyncio.sleep(seconds)
        try:
            return await self._route(request, body)
        except ApiFailure as exc:
            return exc.response()

    def _discovery(self, path: str) -> Obj | None:
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for k in self.kinds.values():
                if k.group:
                    groups.setdefault(k.group, [])
                    if k.version not in groups[k.group]:
                        groups[k.group].append(k.version)
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                        "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                    }
                    for g, vs in sorted(groups.items())
                ],
            }
        m = re.fullmatch(r"/api/(v1)|/apis/([^/]+)/([^/]+)", path)
        if not m:
            return None
        group, version = ("", "v1") if m.group(1) else (m.group(2), m.group(3))
        resources = []
        for k in self.kinds.values():
            if k.group == group and k.version == version:
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                resources.append(
                    {
                        "name": k.plural,
                        "singularName": k.singular or k.kind.lower(),
                        "namespaced": k.namespaced,
                        "kind": k.kind,
                        "verbs": verbs,
                        "shortNames": k.short_names,
                    }
                )
                if k.status:
                    resources.append(
                        {
                            "name": f"{k.plural}/status",
                            "singularName": "",
                            "namespaced": k.namespaced,
                            "kind": k.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
                if k.scale:
                    resources.append(
                        {
                            "name": f"{k.plural}/scale",
                            "singularName": "",
                            "namespaced": k.namespaced,
                            "group": "autoscaling",
                            "version": "v1",
                            "kind": "Scale",
                            "verbs": ["get", "patch", "update"],
                        }
                    )
        if not resources:
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _parse(self, path: str) -> tuple[Kind, str | None, str | None, str | None]:
        m = re.fullmatch(
            r"/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
            r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?",
            path,
        )
        if not m:
            raise ApiFailure(404, "NotFound", f"the server could not find the requested resource ({path})")
        group, version = ("", "v1") if m.group("cv") else (m.group("g"), m.group("v"))
        k = self.kinds.get((group, version, m.group("plural")))
        ns, name, sub = m.group("ns"), m.group("name"), m.group("sub")
        if k is None:
            raise ApiFailure(404, "NotFound", f"the server could not find the requested resource ({path})")
        if not k.namespaced and ns is not None:
            raise ApiFailure(404, "NotFound", f"{k.plural} is not namespaced")
        return k, ns, name, sub

    async def _route(self, request: web.Request, body: Any) -> web.StreamResponse:
        path = request.path.rstrip("/")
        doc = self._discovery(path)
        if doc is not None:
            return web.json_response(doc)
        parts = path.split("/")
        if (
            parts[:4] == ["", "api", "v1", "namespaces"]
            and len(parts) <= 6
            and (len(parts) < 6 or parts[5] == "status")
        ):
            # /api/v1/namespaces[/NAME[/status]]: the Namespace objects themselves
            k, ns = self.kinds[("", "v1", "namespaces")], None
            name = parts[4] if len(parts) > 4 else None
            sub = parts[5] if len(parts) > 5 else None
        else:
            k, ns, name, sub = self._parse(path)
        scope = (ns or "") if k.namespaced else ""
        method = request.method
        query = request.query
        if name is None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                return await self._watch(request, k, ns)
            if method == "GET":
                return self._list(k, ns, query)
            if method == "POST":
                async with self.lock:
                    if k.namespaced and not ns:
                        raise ApiFailure(400, "BadRequest", "a namespace is required")
                    return web.json_response(self._create(k, scope, copy.deepcopy(body or {})), status=201)
            raise ApiFailure(405, "MethodNotAllowed", f"{method} on a collection")
        if sub not in (None, "status", "scale"):
            raise ApiFailure(404, "NotFound", f"no subresource {sub}")
        if (sub == "status" and not k.status) or (sub == "scale" and not k.scale):
            raise ApiFailure(404, "NotFound", f"{k.plural} has no {sub} subresource")
        async with self.lock:
            if sub == "scale":
                return web.json_response(self._scale(k, scope, name, method, body))
            if method == "GET":
                return web.json_response(copy.deepcopy(self._existing(k, scope, name)))
            if method == "PUT":
                return web.json_response(self._replace(k, scope, name, body or {}, sub))
            if method == "PATCH":
                if "json-patch" in request.content_type:
                    return web.json_response(self._json_patch(k, scope, name, body, sub))
                return web.json_response(self._patch(k, scope, name, body, sub))
            if method == "DELETE":
                return web.json_response(self._delete(k, scope, name))
        raise ApiFailure(405, "MethodNotAllowed", method)

    def _scale(self, k: Kind, ns: str, name: str, method: str, body: Any) -> Obj:
        assert k.scale is not None
        obj = self._existing(k, ns, name)
        spec_path = k.scale["specReplicasPath"].lstrip(".").split(".")
        if method in ("PUT", "PATCH"):
            replicas = int(((body or {}).get("spec") or {}).get("replicas"))
            patch: Obj = {}
            cur = patch
            for part in spec_path[:-1]:
                cur = cur.setdefault(part, {})
            cur[spec_path[-1]] = replicas
            obj = self._patch(k, ns, name, patch, None)

        def at(path: str) -> Any:
            cur: Any = obj
            for part in path.lstrip(".").split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            return cur

        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": obj["metadata"]["uid"],
                "resourceVersion": obj["metadata"]["resourceVersion"],
            },
            "spec": {"replicas": at(k.scale["specReplicasPath"]) or 0},
            "status": {
                "replicas": at(k.scale["statusReplicasPath"]) or 0,
                "selector": at(k.scale.get("labelSelectorPath", "")) or "",
            },
        }

    def _list(self, k: Kind, ns: str | None, query: Any) -> web.Response:
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(query.get("fieldSelector"))
        items = [
            o
            for (o_ns, _), o in sorted(self._store(k).items())
            if (ns is None or o_ns == ns) and labels(o["metadata"].get("labels") or {}) and fields(o)
        ]
        # Pages as the API server sends them for ?limit=N: the continue token is where the next starts
        # (the real one is opaque, and its list is a snapshot; this one reads the store again).
        start = int(query.get("continue") or 0)
        end = start + int(query["limit"]) if query.get("limit") else len(items)
        metadata: Obj = {"resourceVersion": str(self.last_rv)}
        if end < len(items):
            metadata["continue"] = str(end)
        return web.json_response(
            {
                "kind": f"{k.kind}List",
                "apiVersion": k.api_version,
                "metadata": metadata,
                "items": [copy.deepcopy(o) for o in items[start:end]],
            }
        )

    async def _watch(self, request: web.Request, k: Kind, ns: str | None) -> web.StreamResponse:
        query = request.query
        w = Watcher(
            k, ns, label_matcher(query.get("labelSelector")), field_matcher(query.get("fieldSelector")), asyncio.Queue()
        )
        since = query.get("resourceVersion")
        backlog: list[tuple[str, Obj]] = []
        async with self.lock:
            if since in (None, "", "0"):
                backlog = [
                    ("ADDED", copy.deepcopy(o))
                    for (o_ns, _), o in sorted(self._store(k).items())
                    if self._matches(w, o)
                ]
            else:
                start = int(since)
                oldest = self.history[0][0] if self.history else self.last_rv
                if start < oldest - 1 and len(self.history) >= self.HISTORY:
                    gone = {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": f"too old resource version: {start}",
                        },
                    }
                    return web.Response(text=json.dumps(gone) + "\n", content_type="application/json")
                backlog = [
                    (ev, copy.deepcopy(o))
                    for rv, key, ev, o in self.history
                    if rv > start and key == (k.group, k.version, k.plural) and self._matches(w, o)
                ]
            self.watchers.append(w)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            for event, obj in backlog:
                await response.write((json.dumps({"type": event, "object": obj}) + "\n").encode())
            while not self.stopping.is_set():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), timeout=min(remaining, 5.0))
                except TimeoutError:
                    if query.get("allowWatchBookmarks") in ("true", "1"):
                        bookmark = {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": k.kind,
                                "apiVersion": k.api_version,
                                "metadata": {"resourceVersion": str(self.last_rv)},
                            },
                        }
                        await response.write((json.dumps(bookmark) + "\n").encode())
                    continue
                if item is None:
                    break
                await response.write((json.dumps({"type": item[0], "object": item[1]}) + "\n").encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(ValueError):
                self.watchers.remove(w)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def running_emulator(**kwargs: Any) -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator(**kwargs)
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()
