"""kopf wiring: thin handlers around one level-based reconcile.

Create, update, resume and a periodic resync all call :func:`reconcile_body`: observe, plan, apply.
The resync is what keeps status fresh (worker reports, Deployment readiness, autoscaling, pruning),
since kopf does not call change handlers for status-only changes. A per-object lock keeps a resync
pass and a change pass of the same publisher from interleaving.

No finalizer: deletion has nothing for the operator to do (children go with the publisher through
their ownerReferences), so deleting an OutboxPublisher never waits for the operator, even when it is
stopped or uninstalled. kopf's own timers and daemons always put a finalizer on the object, so the
resync is a plain loop over the publishers kopf's watch has seen (an ``on.event`` handler keeps the
latest body of each), started and stopped with the operator. A finalizer left by an older operator
version is removed by kopf on the first event, since no handler requires one.

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
from .kube import ApiError, Kube, api_client_from_environment, bearer_token, configuration_from_environment
from .kube import reconcile as reconcile_once
from .reconcile import backoff_seconds

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the handlers share: configuration, the API client, per-object locks."""

    config: OperatorConfig
    resync_seconds: float = 10.0
    kube: Kube | None = None
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # uid -> latest body seen by the watch, for the resync loop
    known: dict[str, dict[str, Any]] = field(default_factory=dict)
    resync_task: asyncio.Task[None] | None = None

    def client(self) -> Kube:
        if self.kube is None:
            self.kube = Kube(api_client_from_environment())
        return self.kube


async def reconcile_body(
    runtime: Runtime, body: Mapping[str, Any], retry: int, *, from_timer: bool, logger: Any = log
) -> None:
    """One pass for one publisher; raises kopf errors only from change handlers (not the resync)."""
    plain = copy.deepcopy(dict(body))
    uid = plain["metadata"]["uid"]
    lock = runtime.locks.setdefault(uid, asyncio.Lock())
    async with lock:
        try:
            result = await reconcile_once(runtime.client(), plain, runtime.config)
        except ApiError as exc:
            if from_timer:
                logger.warning("reconcile failed, retrying at the next resync: %s", exc)
                return
            raise kopf.TemporaryError(str(exc), delay=backoff_seconds(retry)) from exc
    if result.invalid is not None:
        if not from_timer:
            raise kopf.PermanentError(f"invalid spec: {result.invalid}")
    elif result.retry_reason is not None and not from_timer:
        raise kopf.TemporaryError(result.retry_reason, delay=backoff_seconds(retry))


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


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = (c.GROUP, c.VERSION, c.PLURAL)

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

    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    @kopf.on.resume(*resource, registry=registry)
    async def on_change(body: kopf.Body, retry: int, logger: Any, **_: Any) -> None:
        await reconcile_body(runtime, body, retry, from_timer=False, logger=logger)

    @kopf.on.event(*resource, registry=registry)
    def remember(body: kopf.Body, type: str | None, **_: Any) -> None:
        uid = body["metadata"]["uid"]
        if type == "DELETED":
            forget(runtime, uid)
        else:
            runtime.known[uid] = copy.deepcopy(dict(body))

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        runtime.resync_task = asyncio.create_task(resync_forever(runtime), name="outbox-resync")

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(**_: Any) -> None:
        task, runtime.resync_task = runtime.resync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return registry


def forget(runtime: Runtime, uid: str) -> None:
    runtime.known.pop(uid, None)
    runtime.locks.pop(uid, None)


async def resync_once(runtime: Runtime) -> None:
    """One reconcile pass over every known publisher that is not being deleted (concurrently; each
    pass is bounded by the API client's timeout and logs, never raises, its errors)."""
    bodies = [b for b in list(runtime.known.values()) if not b["metadata"].get("deletionTimestamp")]
    await asyncio.gather(*(reconcile_body(runtime, body, 0, from_timer=True) for body in bodies))


async def resync_forever(runtime: Runtime) -> None:
    """Every ``resync_seconds``: a pass over all publishers. Runs until cancelled at shutdown."""
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
