"""What one operator costs the API server, measured on the real control plane (#22).

N paused publishers (no workers) plus ``ACTIVE`` active ones (one worker each; no scheduler runs
here, so their pods stay Pending, which is all the operator sees of them anyway), with the operator
as its own process (``outboxctl operator``). Reported, as text and JSON:

* at rest and during a burst of spec changes: the API server's ``apiserver_request_total`` by verb
  (watches excluded; the test's own spec patches taken out) for what the operator reads and
  writes: OutboxPublishers and their status, its six child kinds, Secrets and Pods (reads only:
  the operator never writes them) and core Events. The API server does not label requests by
  client: at rest nothing else touches these; in the burst the deployment controller's own
  Deployment updates (the revision annotation) are included;
* the operator's CPU (share of one core) and RSS, from /proc;
* p50/p99 from a spec change to the Deployment reflecting it (seen on a watch), the time to
  recreate deleted children, and the time from a worker's report to ``.status.totals``.

The default run uses a small N and asserts only correctness (every Deployment reflected the change,
every deleted child came back, every report reached the totals): no timed assert. To measure:

    OUTBOX_SCALE_N=100 OUTBOX_SCALE_JSON=/tmp/scale.json \\
        .venv/bin/python -m pytest -q -s -m cluster tests/cluster/test_operator_scale.py
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from clusterkit import KIND
from controlplane import ControlPlane
from kubeapi import KubeApi
from relaykit import publisher, secret

from support.polling import wait_for

PAUSED = int(os.environ.get("OUTBOX_SCALE_N", "6"))
ACTIVE = int(os.environ.get("OUTBOX_SCALE_ACTIVE", "2"))
REST_SECONDS = float(os.environ.get("OUTBOX_SCALE_REST_SECONDS", "15"))
SETTLE_SECONDS = 5.0  # after convergence, before the at-rest window
CONVERGE_TIMEOUT_S = 60 + PAUSED * 2.0
CHANGE_TIMEOUT_S = 60.0
DELETED_CHILDREN = 3
REPORTS = 3
POLL_S = 0.02

pytestmark = pytest.mark.timeout(int(300 + PAUSED * 6 + REST_SECONDS * 2))

# (resource, subresource) -> verbs counted as the operator's: what it reads and writes
OPERATOR_REQUESTS: dict[tuple[str, str], frozenset[str]] = {
    ("outboxpublishers", ""): frozenset({"GET", "LIST", "PATCH", "PUT"}),
    ("outboxpublishers", "status"): frozenset({"GET", "PATCH", "PUT"}),
    **{
        (plural, ""): frozenset({"GET", "LIST", "POST", "PUT", "PATCH", "DELETE"})
        for plural in ("deployments", "services", "serviceaccounts", "roles", "rolebindings", "poddisruptionbudgets")
    },
    ("secrets", ""): frozenset({"GET", "LIST"}),
    ("pods", ""): frozenset({"GET", "LIST"}),
    ("events", ""): frozenset({"POST"}),
}
_METRIC = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def operator_requests(metrics_text: str) -> dict[str, float]:
    """Counter values of ``apiserver_request_total`` by verb for the operator's requests."""
    by_verb: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = _METRIC.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("group") not in ("", "apps", "policy", "rbac.authorization.k8s.io", "outbox.dev"):
            continue
        verbs = OPERATOR_REQUESTS.get((labels.get("resource", ""), labels.get("subresource", "")))
        if verbs and labels.get("verb") in verbs:
            by_verb[labels["verb"]] = by_verb.get(labels["verb"], 0.0) + float(match["value"])
    return by_verb


@dataclass
class Meter:
    """The API server's counters and the operator process's CPU and RSS, sampled around a window."""

    api: KubeApi
    pid: int
    samples: list[tuple[float, dict[str, float], float]] = field(default_factory=list)

    async def sample(self) -> None:
        status, text = await self.api.request("GET", "/metrics")
        assert status == 200, text
        self.samples.append((time.monotonic(), operator_requests(str(text)), cpu_seconds(self.pid)))

    def window(self, own: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Rates between the last two samples; ``own``: the test's own requests by verb, taken out."""
        (t0, r0, c0), (t1, r1, c1) = self.samples[-2], self.samples[-1]
        seconds = t1 - t0
        own = own or {}
        per_verb = {
            verb: round((r1.get(verb, 0) - r0.get(verb, 0) - own.get(verb, 0)) / seconds, 3) for verb in sorted(r1)
        }
        return {
            "seconds": round(seconds, 1),
            "requests_per_second": round(sum(per_verb.values()), 3),
            "requests_per_second_by_verb": {v: r for v, r in per_verb.items() if r},
            "cpu_percent_of_a_core": round(100 * (c1 - c0) / seconds, 2),
            "rss_mb": rss_mb(self.pid),
        }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise AssertionError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass
class DeploymentWatch:
    """A watch on the namespace's Deployments: which exist, when each was last ADDED, and when each
    first showed each value of the ``BENCH_MARK`` env variable."""

    present: set[str] = field(default_factory=set)
    added: dict[str, float] = field(default_factory=dict)
    marked: dict[tuple[str, str], float] = field(default_factory=dict)  # (name, mark) -> first seen

    def record(self, kind: str, obj: dict[str, Any], now: float) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.present.discard(name)
            return
        self.present.add(name)
        if kind == "ADDED":
            self.added[name] = now
        mark = marker_of(obj)
        if mark is not None:
            self.marked.setdefault((name, mark), now)


def marker_of(deployment: dict[str, Any]) -> str | None:
    for container in deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []:
        for entry in container.get("env") or []:
            if entry.get("name") == "BENCH_MARK":
                return str(entry.get("value"))
    return None


async def follow_deployments(control_plane: ControlPlane, namespace: str, watch: DeploymentWatch) -> None:
    url = f"{control_plane.server}/apis/apps/v1/namespaces/{namespace}/deployments"
    headers = {"Authorization": f"Bearer {control_plane.admin_token}"}
    context = ssl.create_default_context(cafile=str(control_plane.ca_file))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as session:
        params = {"watch": "true", "timeoutSeconds": "3600"}
        async with session.get(url, params=params, headers=headers, ssl=context) as response:
            async for line in response.content:
                event = json.loads(line)
                watch.record(event["type"], event["object"], time.monotonic())


@pytest.fixture
async def operator_pid(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> AsyncIterator[int]:
    """``outboxctl operator`` as its own process on ``namespace`` (30 s safety-net resync)."""
    log = tmp_path / "operator.log"
    level = os.environ.get("OUTBOX_SCALE_LOG_LEVEL", "WARNING")
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "outbox_cli.main", "operator", "--namespace", namespace, "--log-level", level),
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    try:
        yield process.pid
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
        tail = log.read_text()[-3000:]
        if "Traceback" in tail or os.environ.get("OUTBOX_SCALE_LOG_LEVEL"):
            print(f"operator log tail:\n{tail}")


def names() -> tuple[list[str], list[str]]:
    return [f"idle-{i:03d}" for i in range(PAUSED)], [f"busy-{i}" for i in range(ACTIVE)]


async def create_publishers(api: KubeApi, namespace: str) -> None:
    paused, active = names()
    for name in [*paused, *active]:
        await api.create(secret(f"{name}-db", "postgresql://unused@127.0.0.1:1/db"), namespace)
        body = publisher(name, "nats://127.0.0.1:4222", replicas=1)
        body["spec"]["paused"] = name in paused
        body["spec"]["reportIntervalSeconds"] = 10
        await api.create(body, namespace)


async def converged(api: KubeApi, namespace: str) -> bool:
    items = await api.list(KIND, namespace)
    return len(items) == PAUSED + ACTIVE and all(
        (i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"] for i in items
    )


async def spec_change_burst(api: KubeApi, namespace: str, watch: DeploymentWatch) -> list[float]:
    """Change every publisher's spec once, as fast as the API takes it; seconds until each
    Deployment showed the change on the watch."""
    mark = secrets.token_hex(4)
    started: dict[str, float] = {}
    for name in [*names()[0], *names()[1]]:
        started[f"{name}-relay"] = time.monotonic()
        patch = {"spec": {"worker": {"env": [{"name": "BENCH_MARK", "value": mark}]}}}
        status, body = await api.merge_patch(KIND, namespace, name, patch)
        assert status == 200, body

    def all_reflected() -> bool:
        return all((dep, mark) in watch.marked for dep in started)

    await wait_for(all_reflected, CHANGE_TIMEOUT_S, POLL_S)
    return [watch.marked[dep, mark] - t0 for dep, t0 in started.items()]


async def recreate_times(api: KubeApi, namespace: str, watch: DeploymentWatch) -> list[float]:
    """Delete a few Deployments; seconds until each is back (its ADDED event on the watch)."""
    times = []
    for name in names()[0][:DELETED_CHILDREN]:
        dep = f"{name}-relay"
        before = watch.added.get(dep, 0.0)
        t0 = time.monotonic()
        assert await api.delete("Deployment", namespace, dep) in (200, 202)
        await wait_for(lambda d=dep, b=before: watch.added.get(d, 0.0) > b and d in watch.present, 30, POLL_S)
        times.append(watch.added[dep] - t0)
    return times


async def report_times(api: KubeApi, namespace: str) -> list[float]:
    """A worker's report (the merge patch its status sink sends) to ``.status.totals``: seconds."""
    name = names()[1][0]
    pods = await api.list("Pod", namespace, labelSelector=f"outbox.dev/publisher={name}")
    assert pods, f"no worker pod of {name}"
    pod = pods[0]["metadata"]["name"]
    times = []
    for n in range(1, REPORTS + 1):
        report = {
            "pod": pod,
            "partitions": list(range(8)),
            "published": 1000 * n,
            "reportTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        t0 = time.monotonic()
        status, body = await api.merge_patch(KIND, namespace, name, {"status": {"workers": {pod: report}}}, "status")
        assert status == 200, body

        async def totals_show(expected: int = 1000 * n) -> bool:
            obj = await api.get(KIND, namespace, name)
            return ((obj or {}).get("status") or {}).get("totals", {}).get("published") == expected

        await wait_for(totals_show, 30, POLL_S)
        times.append(time.monotonic() - t0)
    return times


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(percentile(values, 50), 3),
        "p99_s": round(percentile(values, 99), 3),
        "max_s": round(max(values), 3),
    }


async def test_operator_cost_at_rest_and_under_a_burst_of_spec_changes(
    crd: str, api: KubeApi, control_plane: ControlPlane, namespace: str, operator_pid: int
) -> None:
    assert crd
    watch = DeploymentWatch()
    follower = asyncio.create_task(follow_deployments(control_plane, namespace, watch))
    meter = Meter(api, operator_pid)
    try:
        await create_publishers(api, namespace)
        await wait_for(lambda: converged(api, namespace), CONVERGE_TIMEOUT_S, 0.5)
        await asyncio.sleep(SETTLE_SECONDS)
        await meter.sample()
        await asyncio.sleep(REST_SECONDS)
        await meter.sample()
        at_rest = meter.window()
        await meter.sample()
        latencies = await spec_change_burst(api, namespace, watch)
        await meter.sample()
        burst = meter.window(own={"PATCH": len(latencies)})  # the test's own spec patches
        recreated = await recreate_times(api, namespace, watch)
        reports = await report_times(api, namespace)
    finally:
        follower.cancel()
    result = {
        "publishers": {"paused": PAUSED, "active": ACTIVE},
        "at_rest": at_rest,
        "spec_change_burst": {**burst, "changes": len(latencies), "deployment_reflects": summary(latencies)},
        "deleted_deployment_back": summary(recreated),
        "worker_report_to_totals": summary(reports),
    }
    print("\noperator at scale:", json.dumps(result, indent=2))
    if os.environ.get("OUTBOX_SCALE_JSON"):
        Path(os.environ["OUTBOX_SCALE_JSON"]).write_text(json.dumps(result, indent=2) + "\n")
    # correctness only (numbers are printed, not asserted)
    assert len(latencies) == PAUSED + ACTIVE
    assert len(recreated) == min(DELETED_CHILDREN, PAUSED)
    assert len(reports) == REPORTS
