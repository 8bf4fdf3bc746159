"""kopf wiring: thin handlers around one level-based reconcile.

Create, update, resume and a periodic timer all call :func:`reconcile_body`: observe, plan, apply.
The timer is what keeps status fresh (worker reports, Deployment readiness, autoscaling, pruning),
since kopf does not call change handlers for status-only changes. A per-object lock keeps a timer
pass and a change pass of the same publisher from interleaving.

Handlers are registered on a registry built by :func:`build_registry` (no import-time side
effects), so tests and ``outboxctl operator`` each get their own.
"""

from __future__ import annotations

import asyncio
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

    def client(self) -> Kube:
        if self.kube is None:
            self.kube = Kube(api_client_from_environment())
        return self.kube


async def reconcile_body(
    runtime: Runtime, body: Mapping[str, Any], retry: int, *, from_timer: bool, logger: Any = log
) -> None:
    """One pass for one publisher; raises kopf errors only from change handlers (not the timer)."""
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
    # A publisher deleted while its resync timer is reconciling keeps kopf's finalizer until that pass
    # ends, and kopf looks again only after cancellation_polling seconds: 60 by default, so deleting
    # could hang for a minute. A pass is a few API calls, each bounded by the client's timeouts.
    settings.background.cancellation_polling = 1.0


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

    @kopf.timer(*resource, interval=runtime.resync_seconds, initial_delay=runtime.resync_seconds, registry=registry)
    async def on_timer(body: kopf.Body, logger: Any, **_: Any) -> None:
        await reconcile_body(runtime, body, 0, from_timer=True, logger=logger)

    @kopf.on.delete(*resource, registry=registry, optional=True)
    def on_delete(body: kopf.Body, **_: Any) -> None:
        # Children go with the publisher through their ownerReferences (garbage collection).
        runtime.locks.pop(body["metadata"]["uid"], None)

    return registry


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
