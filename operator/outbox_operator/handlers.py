"""kopf wiring: thin handlers around one level-based reconcile, fed by watches.

What a reconcile reads comes from kopf's watches, never from API reads (see state.py): the
OutboxPublishers (an ``on.event`` handler keeps the latest body of each), the children the operator
owns (label ``app.kubernetes.io/managed-by=outbox-operator``) and the worker Pods (labels
``app.kubernetes.io/component=worker`` and ``outbox.dev/publisher``), both selected by the API
server, and the Secrets in the watched namespaces (key names and resourceVersions only; not Helm's
release Secrets or service-account tokens, which the API server leaves out). So a pass over an
unchanged publisher sends no request at all; only writes reach the API server.

When a pass runs:

* a spec change: kopf's create/update/resume handlers, at once;
* a change of a child (edited, deleted, its Deployment's rollout status), a worker Pod appearing
  or going, a referenced Secret written: the owning publisher, at once (``CHANGE_DELAY_SECONDS``);
* a worker's report (``status.workers`` changed): the publisher, after ``REPORT_COALESCE_SECONDS``
  so reports arriving together cost one status patch;
* every ``resync_seconds`` (default 30 s): a safety-net pass over every publisher, from the same
  in-memory state. It re-evaluates what only time changes (a report going stale) and heals anything
  a missed watch event left behind; it costs no API read.

Events that change nothing the operator acts on are ignored: the echo of its own writes (status
patch, child writes), kopf's annotations, a child's fields the plan does not read (a Deployment's
conditions), a Pod's readiness flapping (the Deployment's status carries it), the initial LIST of
a watch. A per-object lock keeps two passes of the same publisher from interleaving.

No finalizer: deletion has nothing for the operator to do (children go with the publisher through
their ownerReferences), so deleting an OutboxPublisher never waits for the operator, even when it is
stopped or uninstalled. kopf's own timers and daemons always put a finalizer on the object, so the
resync is a plain loop, started and stopped with the operator. A finalizer left by an older
operator version is removed by kopf on the first event, since no handler requires one.

Every handler is a coroutine: kopf runs plain functions in a thread pool, and nothing here needs one.

Handlers are registered on a registry built by :func:`build_registry` (no import-time side
effects), so tests and ``outboxctl operator`` each get their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import constants as c
from .children import OperatorConfig
from .kube import ApiError, Kube, bearer_token, configuration_from_environment
from .kube import reconcile as reconcile_once
from .reconcile import backoff_seconds, secret_names
from .state import CHILD_RESOURCES, ClusterState, plan_inputs, secret_facts, slim

log = logging.getLogger(__name__)

DEFAULT_RESYNC_SECONDS = 30.0
# A pass after a child, Pod or Secret event waits this long, so a burst of events costs one pass.
CHANGE_DELAY_SECONDS = 0.05
# A pass after a worker's report waits this long: reports of several workers share one patch.
REPORT_COALESCE_SECONDS = 0.5
# A pass triggered by an event that failed on an API error is tried again after this long.
RETRY_SECONDS = 5.0
MANAGED_SELECTOR = f"{c.LABEL_MANAGED_BY}={c.MANAGER}"
# worker Pods as the Deployment's selector sees them (any publisher)
WORKER_POD_SELECTOR = f"{c.LABEL_COMPONENT}={c.COMPONENT_WORKER},{c.LABEL_PUBLISHER}"
# Secrets of these types can hold nothing a publisher refers to, and are the bulk of a cluster's
# Secrets: Helm keeps every revision of every release as one (up to 1 MiB each), and older clusters
# a token per service account. The API server leaves them out of the operator's watch.
IGNORED_SECRET_TYPES = ("helm.sh/release.v1", "kubernetes.io/service-account-token")
SECRET_FIELD_SELECTOR = ",".join(f"type!={t}" for t in IGNORED_SECRET_TYPES)
# Objects per page of a watch's initial LIST: the operator never holds a whole cluster's Secrets
# (or Pods) in one response.
LIST_CHUNK_SIZE = 500


@dataclass
class Runtime:
    """What the handlers share: configuration, the API client, the watch-fed state, per-object
    locks and the passes waiting to run."""

    config: OperatorConfig
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    kube: Kube | None = None
    state: ClusterState = field(default_factory=ClusterState)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # uid -> latest body seen by the watch
    known: dict[str, dict[str, Any]] = field(default_factory=dict)
    # uid -> names of the Secrets its spec refers to (which Secret events concern it)
    secret_users: dict[str, frozenset[str]] = field(default_factory=dict)
    pending: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # (namespace, kind, name) -> what the plan reads of that child, as last seen
    child_inputs: dict[tuple[str, str, str], tuple[Any, ...]] = field(default_factory=dict)
    resync_task: asyncio.Task[None] | None = None

    def client(self) -> Kube:
        if self.kube is None:
            self.kube = Kube(configuration_from_environment())
        return self.kube

    def current_body(self, uid: str) -> dict[str, Any] | None:
        """The newest body of a publisher: the operator's own status patch until the watch shows it."""
        body = self.known.get(uid)
        if body is None:
            return None
        meta = body["metadata"]
        pending, written = self.state.written.lookup((meta["namespace"], c.KIND, meta["name"]))
        return copy.deepcopy(written) if pending and written is not None else body

    def uids_in(self, namespace: str, *, name: str | None = None, secret: str | None = None) -> list[str]:
        """Publishers in ``namespace``, by name or by a Secret they refer to."""
        return [
            uid
            for uid, body in self.known.items()
            if body["metadata"]["namespace"] == namespace
            and (name is None or body["metadata"]["name"] == name)
            and (secret is None or secret in self.secret_users.get(uid, frozenset()))
        ]


async def reconcile_body(
    runtime: Runtime, body: Mapping[str, Any], retry: int, *, self_started: bool, logger: Any = log
) -> None:
    """One pass for one publisher. From kopf's change handlers (``self_started=False``) an API error
    or a plan to retry raises kopf's TemporaryError, an invalid spec PermanentError. Passes the
    operator starts itself (``self_started=True``: :func:`request_pass` after a watch event, and
    the resync) raise nothing: an API error is logged and the pass asked for again in
    ``RETRY_SECONDS``; a missing Secret waits for that Secret's watch event or the resync."""
    uid = body["metadata"]["uid"]
    lock = runtime.locks.setdefault(uid, asyncio.Lock())
    async with lock:
        plain = copy.deepcopy(dict(newest_body(runtime, body, self_started=self_started)))
        try:
            result = await reconcile_once(runtime.client(), runtime.state, plain, runtime.config)
        except ApiError as exc:
            if self_started:
                logger.warning("reconcile failed, retrying in %gs: %s", RETRY_SECONDS, exc)
                request_pass(runtime, uid, RETRY_SECONDS)
                return
            raise kopf.TemporaryError(str(exc), delay=backoff_seconds(retry)) from exc
    if result.invalid is not None:
        if not self_started:
            raise kopf.PermanentError(f"invalid spec: {result.invalid}")
    elif result.retry_reason is not None and not self_started:
        raise kopf.TemporaryError(result.retry_reason, delay=backoff_seconds(retry))


def newest_body(runtime: Runtime, body: Mapping[str, Any], *, self_started: bool) -> Mapping[str, Any]:
    """The body a pass acts on, once it holds its publisher's lock: the watch-fed one (the newest)
    for a pass the operator started itself, and for kopf's when the watch has seen a newer spec.
    The body was read before the pass waited for the lock; the resync reads every publisher and
    only then starts its passes, so a spec change handled in between (kopf's pass, holding the
    lock first) would be undone by a pass with the older spec: its template put back on the
    Deployment (a rollout back and forth), observedGeneration moved backwards."""
    newest = runtime.current_body(body["metadata"]["uid"])
    if newest is None:
        return body
    if self_started or _generation(newest) > _generation(body):
        return newest
    return body


def _generation(body: Mapping[str, Any]) -> int:
    return int(body["metadata"].get("generation") or 0)


def request_pass(runtime: Runtime, uid: str, delay: float) -> None:
    """Run a pass for ``uid`` after ``delay`` seconds, unless one is already waiting (it will read
    the newest state when it runs, so one is enough)."""
    if uid in runtime.pending or uid not in runtime.known:
        return
    runtime.pending[uid] = asyncio.create_task(_pass_later(runtime, uid, delay), name=f"outbox-pass-{uid}")


async def _pass_later(runtime: Runtime, uid: str, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        runtime.pending.pop(uid, None)
    body = runtime.current_body(uid)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    try:
        await reconcile_body(runtime, body, 0, self_started=True)
    except Exception:  # a bug in one pass must not go unseen in a task nobody awaits
        log.exception("reconcile pass of %s failed", body["metadata"].get("name"))


def reports_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Did the workers' part of the status change? (The operator's own keys never trigger a pass.)"""
    return bool(((old or {}).get("status") or {}).get("workers") != (new.get("status") or {}).get("workers"))


def controller_uid(body: Mapping[str, Any]) -> str | None:
    """The uid of the OutboxPublisher that controls a child, if one does."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == c.KIND and ref.get("controller"):
            return str(ref.get("uid"))
    return None


def configure_settings(settings: kopf.OperatorSettings, *, clusterwide: bool = True) -> None:
    """Keep kopf's own bookkeeping in annotations of our group (the status schema is strict), post
    only warnings as Events (our reconcile posts its own), and use watches that time out.

    A namespaced operator (``clusterwide=False``) never scans the cluster: it has no permission to
    list Namespaces or CRDs (the chart grants Roles in the watched namespaces only), and kopf would
    retry each 403 for about a minute before serving anything. It watches exactly the namespaces it
    was given and the resources the API server lists at start-up (the CRD is installed first)."""
    settings.scanning.disabled = not clusterwide
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{c.GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # children and worker Pods: only those the operator manages, selected by the API server
    for api_version, plural in CHILD_RESOURCES.values():
        group, _, version = api_version.rpartition("/")
        settings.watching.label_selectors[(group, version, plural) if group else (version, plural)] = MANAGED_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = WORKER_POD_SELECTOR
    # Secrets: any a publisher may refer to, not Helm's releases or service-account tokens
    settings.watching.field_selectors["v1", "secrets"] = SECRET_FIELD_SELECTOR
    settings.watching.chunk_size = LIST_CHUNK_SIZE


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """Every handler of the operator: login, publishers, the watch-fed state, start and stop."""
    registry = kopf.OperatorRegistry()
    _register_login(registry)
    _register_publishers(registry, runtime)
    _register_children(registry, runtime)
    _register_pods_and_secrets(registry, runtime)
    _register_lifecycle(registry, runtime)
    return registry


def _register_login(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # the same credentials as the adapter's client: in-cluster, else $KUBECONFIG
        cfg = configuration_from_environment()
        token = bearer_token(cfg)
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            username=cfg.username or None,
            password=cfg.password or None,
            scheme="Bearer" if token else None,
            token=token,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
        )


def _register_publishers(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    resource = (c.GROUP, c.VERSION, c.PLURAL)

    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    @kopf.on.resume(*resource, registry=registry)
    async def on_change(body: kopf.Body, retry: int, logger: Any, **_: Any) -> None:
        await reconcile_body(runtime, body, retry, self_started=False, logger=logger)

    @kopf.on.event(*resource, registry=registry)
    async def remember(body: kopf.Body, type: str | None, **_: Any) -> None:
        meta = body["metadata"]
        uid = meta["uid"]
        runtime.state.written.seen((meta["namespace"], c.KIND, meta["name"]), None if type == "DELETED" else body)
        if type == "DELETED":
            forget(runtime, uid)
            return
        old = runtime.known.get(uid)
        runtime.known[uid] = copy.deepcopy(dict(body))
        runtime.secret_users[uid] = frozenset(secret_names(body))
        if old is not None and reports_changed(old, body):
            request_pass(runtime, uid, REPORT_COALESCE_SECONDS)


def _register_children(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    for api_version, plural in CHILD_RESOURCES.values():
        group, _, version = api_version.rpartition("/")
        kopf.index(group, version, plural, id=f"children_{plural}", registry=registry)(index_child)
        kopf.on.event(group, version, plural, id=f"child_event_{plural}", registry=registry)(
            _child_event_handler(runtime)
        )


async def index_child(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    meta = body["metadata"]
    return {(meta["namespace"], meta["name"]): slim(body)}


def _child_event_handler(runtime: Runtime) -> Any:
    async def on_child(body: kopf.Body, type: str | None, **_: Any) -> None:
        """A child changed: its publisher gets a pass, unless the event is the echo of the
        operator's own write or changes nothing the plan reads (a Deployment's other status)."""
        meta = body["metadata"]
        key = (meta["namespace"], body["kind"], meta["name"])
        echo = runtime.state.written.seen(key, None if type == "DELETED" else body)
        inputs = None if type == "DELETED" else plan_inputs(body)
        changed = runtime.child_inputs.get(key) != inputs
        if inputs is None:
            runtime.child_inputs.pop(key, None)
        else:
            runtime.child_inputs[key] = inputs
        uid = controller_uid(body)
        if type is not None and uid is not None and changed and not echo:
            request_pass(runtime, uid, CHANGE_DELAY_SECONDS)
        name = (meta.get("labels") or {}).get(c.LABEL_PUBLISHER)
        if type == "DELETED" and uid is not None and name:
            # a child of a deleted publisher went (its own DELETED event may not have arrived yet): one
            # created again with its name waits for that (Ready=False/PreviousChildren) and gets its
            # pass now, not at the next resync
            for successor in runtime.uids_in(meta["namespace"], name=name):
                if successor != uid:
                    request_pass(runtime, successor, CHANGE_DELAY_SECONDS)

    return on_child


def _register_pods_and_secrets(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.index("v1", "pods", id="worker_pods", registry=registry)
    async def worker_pods(body: kopf.Body, **_: Any) -> dict[tuple[str, str], str]:
        publisher = (body["metadata"].get("labels") or {}).get(c.LABEL_PUBLISHER)
        return {(body["metadata"]["namespace"], publisher): body["metadata"]["name"]} if publisher else {}

    @kopf.on.event("v1", "pods", id="worker_pod_event", registry=registry)
    async def on_pod(body: kopf.Body, type: str | None, **_: Any) -> None:
        """Only a Pod appearing or going matters (its report entry is pruned); status changes do not."""
        publisher = (body["metadata"].get("labels") or {}).get(c.LABEL_PUBLISHER)
        if type in ("ADDED", "DELETED") and publisher:
            for uid in runtime.uids_in(body["metadata"]["namespace"], name=publisher):
                request_pass(runtime, uid, CHANGE_DELAY_SECONDS)

    @kopf.index("v1", "secrets", id="secret_facts", registry=registry)
    async def index_secret(body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
        return {(body["metadata"]["namespace"], body["metadata"]["name"]): secret_facts(body)}

    @kopf.on.event("v1", "secrets", id="secret_event", registry=registry)
    async def on_secret(body: kopf.Body, type: str | None, **_: Any) -> None:
        """A Secret written or deleted: every publisher that refers to it gets a pass."""
        if type is None:
            return
        for uid in runtime.uids_in(body["metadata"]["namespace"], secret=body["metadata"]["name"]):
            request_pass(runtime, uid, CHANGE_DELAY_SECONDS)


def _register_lifecycle(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.on.startup(registry=registry)
    async def start(**kwargs: Any) -> None:
        # kopf hands every index to every handler by its id; the reconcile reads them from the state
        runtime.state.children = {kind: kwargs[f"children_{plural}"] for kind, (_, plural) in CHILD_RESOURCES.items()}
        runtime.state.pods = kwargs["worker_pods"]
        runtime.state.secrets = kwargs["secret_facts"]
        runtime.resync_task = asyncio.create_task(resync_forever(runtime), name="outbox-resync")

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        tasks = [t for t in [runtime.resync_task, *runtime.pending.values()] if t is not None]
        runtime.resync_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if runtime.kube is not None:
            await runtime.kube.close()


def forget(runtime: Runtime, uid: str) -> None:
    runtime.known.pop(uid, None)
    runtime.locks.pop(uid, None)
    runtime.secret_users.pop(uid, None)


async def resync_once(runtime: Runtime) -> None:
    """The safety net: one pass over every known publisher that is not being deleted, from the
    watch-fed state (concurrently; each pass logs, never raises, its errors)."""
    bodies = [runtime.current_body(uid) for uid in list(runtime.known)]
    live = [b for b in bodies if b is not None and not b["metadata"].get("deletionTimestamp")]
    await asyncio.gather(*(reconcile_body(runtime, body, 0, self_started=True) for body in live))


async def resync_forever(runtime: Runtime) -> None:
    """Every ``resync_seconds``: the safety-net pass over all publishers. Runs until cancelled."""
    while True:
        await asyncio.sleep(runtime.resync_seconds)
        try:
            await resync_once(runtime)
        except Exception:  # a bug in one pass must not end the resync for good
            log.exception("resync pass failed; trying again in %gs", runtime.resync_seconds)


async def run_operator(
    runtime: Runtime,
    *,
    namespaces: list[str],
    clusterwide: bool,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run kopf until stopped (SIGTERM/SIGINT, or ``stop_flag`` in tests)."""
    registry = build_registry(runtime)
    settings = kopf.OperatorSettings()
    configure_settings(settings, clusterwide=clusterwide)
    await kopf.operator(
        registry=registry,
        settings=settings,
        standalone=True,
        clusterwide=clusterwide,
        namespaces=namespaces,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
