"""StatusSink for operator mode: each worker writes its own report into its OutboxPublisher.

The report lands in ``status.workers.<pod>`` through a JSON merge patch of the ``/status``
subresource, so workers never overwrite each other's entries and need no read-modify-write.
The worker's Role allows exactly this: ``patch`` on ``outboxpublishers/status`` for its own
publisher (``resourceNames``).

Reporting must never slow or stop publishing: calls run in a thread (the Kubernetes client is
synchronous) with a timeout, writes closer together than ``min_interval`` are dropped, and a
failed write is logged (without the response body, which could echo configuration) and dropped.

The patch rate is bounded: at most one write per ``min_interval`` per worker, and each write waits
a random ``[0, jitter)`` first, so workers that started together do not patch together. With
:func:`sink_for` a worker writes once per ``reportIntervalSeconds`` to 1.2 times that:
100 publishers with two workers each at the default 10 s send 17-20 patches per second in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from outbox_common.config import StatusConfig
from outbox_common.report import StatusSink, WorkerReport

log = logging.getLogger(__name__)

GROUP = "outbox.dev"
VERSION = "v1alpha1"
PLURAL = "outboxpublishers"
MERGE_PATCH = "application/merge-patch+json"

# Each write waits up to this fraction of the report interval first (see the module docstring).
REPORT_JITTER_FRACTION = 0.2

Patcher = Callable[[str, dict[str, Any]], None]  # (path, merge patch) -> None, raises on failure


def status_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


def kubernetes_patcher(timeout: float) -> Patcher:
    """A merge-patch function over the official client (in-cluster, else $KUBECONFIG)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        k8s_config.load_kube_config(config_file=path, client_configuration=configuration)  # type: ignore[no-untyped-call]
    # One attempt per report: urllib3 would retry a failed connect 3 times, each up to ``timeout``,
    # in a thread that outlives the report's own timeout and that the process waits for at exit.
    configuration.retries = 0
    api = k8s.ApiClient(configuration)

    def patch(path: str, body: dict[str, Any]) -> None:
        headers = {"Accept": "application/json", "Content-Type": MERGE_PATCH}
        _, url, headers, payload, _ = api.param_serialize(
            "PATCH", path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = api.call_api("PATCH", url, header_params=headers, body=payload, _request_timeout=timeout)
        response.read()  # type: ignore[no-untyped-call]
        if response.status >= 400:
            reason = ""
            with contextlib.suppress(ValueError):
                reason = str(json.loads(response.data or b"{}").get("reason", ""))
            raise RuntimeError(f"HTTP {response.status} {reason}".strip())

    return patch


class KubeStatusSink(StatusSink):
    """Writes reports of one worker pod into ``status.workers`` of its OutboxPublisher."""

    def __init__(
        self,
        namespace: str,
        name: str,
        *,
        min_interval: float = 1.0,
        jitter: float = 0.0,
        timeout: float = 5.0,
        patcher: Patcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        """Why this size: the target, its two rate bounds and timeout, plus three seams for tests
        (the HTTP patch, the clock, the jitter's random draw), all keyword-only with defaults."""
        self.path = status_path(namespace, name)
        self.min_interval = min_interval
        self.jitter = jitter
        self._uniform = uniform
        self.timeout = timeout
        self._patcher = patcher
        self._clock = clock
        self._last_write = float("-inf")
        self._pod = ""
        self.written = 0
        self.dropped = 0
        self.failed = 0

    def _patch_fn(self) -> Patcher:
        if self._patcher is None:
            self._patcher = kubernetes_patcher(self.timeout)
        return self._patcher

    async def _send(self, body: dict[str, Any]) -> bool:
        try:
            patch = self._patch_fn()
            async with asyncio.timeout(self.timeout + 1):
                await asyncio.to_thread(patch, self.path, body)
        except Exception as exc:  # never raise into the worker: a report is best effort
            self.failed += 1
            log.warning("status report to %s failed (dropped): %s", self.path, _short(exc))
            return False
        return True

    async def write(self, report: WorkerReport) -> None:
        now = self._clock()
        if now - self._last_write < self.min_interval:
            self.dropped += 1
            return
        self._last_write = now
        self._pod = report.pod
        if self.jitter > 0:
            await asyncio.sleep(self.jitter * self._uniform())
        if await self._send({"status": {"workers": {report.pod: report.to_status()}}}):
            self.written += 1

    async def close(self) -> None:
        """On a clean stop, remove this pod's entry (the operator would prune it later anyway)."""
        if self._pod:
            await self._send({"status": {"workers": {self._pod: None}}})


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def sink_for(config: StatusConfig) -> KubeStatusSink:
    """The sink of a worker pod: its publisher is ``config.publisher`` (the OutboxPublisher's
    metadata.name, rendered by the operator) in ``config.namespace``; it writes at most twice per
    report interval, each write after a random wait of up to a fifth of the interval."""
    return KubeStatusSink(
        config.namespace,
        config.publisher,
        min_interval=max(0.5, config.interval_seconds / 2),
        jitter=config.interval_seconds * REPORT_JITTER_FRACTION,
    )
