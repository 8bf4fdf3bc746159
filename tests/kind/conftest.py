"""The kind end-to-end suite: a real cluster from kind-config.yaml, the image built here, the chart.

Run it with ``.venv/bin/python -m pytest -m kind tests/kind -v`` on a machine with Docker and kind.
Where either is missing (or the Docker daemon does not answer) every test is skipped with the reason.

Environment:

* ``KIND_CLUSTER_NAME`` (default ``outbox-e2e``): the cluster to create.
* ``KIND_KEEP_CLUSTER=1``: reuse the cluster if it exists and keep it afterwards (for debugging).
* ``KIND_NODE_IMAGE``: a ``kindest/node`` image, to test another Kubernetes version.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kindsupport import APP_NS, IMAGE, ROOT, Cluster, k8s_tools, missing_prerequisite

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The end-to-end tests carry the ``kind`` marker (excluded by default in pyproject); the
    harness self-tests in test_kind_support.py are ``integration`` tests instead."""
    for item in items:
        if item.path.parent == _HERE and item.path.name.startswith("test_kind_e2e"):
            item.add_marker(pytest.mark.kind)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    tools = k8s_tools()
    name = os.environ.get("KIND_CLUSTER_NAME", "outbox-e2e")
    keep = os.environ.get("KIND_KEEP_CLUSTER") == "1"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    c = Cluster(name, kubeconfig, tools["kubectl"], tools["helm"], env)
    existing = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, check=False).stdout.split()
    created = False
    if name in existing and keep:
        kubeconfig.write_text(c.run(["kind", "get", "kubeconfig", "--name", name]))
    else:
        if name in existing:
            c.run(["kind", "delete", "cluster", "--name", name], timeout=300)
        cmd = ["kind", "create", "cluster", "--name", name, "--config", str(ROOT / "kind-config.yaml")]
        cmd += ["--kubeconfig", str(kubeconfig), "--wait", "180s"]
        if os.environ.get("KIND_NODE_IMAGE"):
            cmd += ["--image", os.environ["KIND_NODE_IMAGE"]]
        c.run(cmd, timeout=600)
        created = True
    try:
        yield c
    finally:
        if created and not keep:
            subprocess.run(["kind", "delete", "cluster", "--name", name], capture_output=True, timeout=300, check=False)


@pytest.fixture(scope="session")
def image(cluster: Cluster) -> str:
    """The repository's Dockerfile, built and loaded into every kind node."""
    cluster.run(["docker", "build", "--tag", IMAGE, str(ROOT)], timeout=1200)
    cluster.run(["kind", "load", "docker-image", IMAGE, "--name", cluster.name], timeout=600)
    return IMAGE


@pytest.fixture(scope="session")
def backing_services(cluster: Cluster) -> None:
    """Namespaces (PSS restricted enforced), PostgreSQL and NATS JetStream from deploy/kind."""
    kind_dir = ROOT / "deploy" / "kind"
    for name in ("namespace.yaml", "postgres.yaml", "nats.yaml"):
        cluster.apply(kind_dir / name)
    for deployment in ("postgres", "nats"):
        cluster.kubectl("-n", APP_NS, "rollout", "status", f"deployment/{deployment}", "--timeout=300s", timeout=330)
