"""Fixtures of the ``cluster`` suite: a real control plane built from Kubernetes' Go modules.

* ``control_plane`` (package scope: tests/cluster): etcd + kube-apiserver + kube-controller-manager
  from the binaries tools/build_control_plane.py built, started once for this directory and stopped
  after its last test, so they never take CPU from the other suites. Missing binaries skip the
  suite with the reason and the command to run, except with ``CI=true``, where they fail it.
* ``crd`` (package): crds/outboxpublisher.yaml applied server-side and Established.
* ``namespace``: a fresh namespace per test, deleted afterwards.
* ``api``: an async admin client (:class:`kubeapi.KubeApi`); ``kubectl``/``helm``: run the genuine
  binaries against the control plane (``$KUBECONFIG`` set for them only).

A failing test's report carries the tails of the control plane's logs and of its pods' logs.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file

from clusterkit import CRD_PATH, ROOT, Kubectl
from controlplane import ControlPlane, ControlPlaneError, environment_with_kubeconfig
from kubeapi import KubeApi

_HERE = Path(__file__).parent
KUBECTL_TIMEOUT_S = 120
CRD_ESTABLISHED_TIMEOUT_S = 60

_running: list[ControlPlane] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in tests/cluster carries the ``cluster`` marker."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _running and _HERE in item.path.parents:
        report.sections.append(("control plane logs (tails)", _running[0].log_tails()))
    node = getattr(item, "funcargs", {}).get("node")
    if report.failed and node is not None:
        report.sections.append(("worker pod logs (tails)", _pod_log_tails(node.log_dir)))


def _pod_log_tails(log_dir: Path, lines: int = 25) -> str:
    """The last ``lines`` of each pod's log the node agent wrote (why a pod exited as it did)."""
    tails = []
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name} ---\n" + "\n".join(text))
    return "\n".join(tails) or f"(no pod logs in {log_dir})"


def load_tool_module(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _unavailable(reason: str) -> None:
    """Skip (a laptop without Go) or, with CI=true, fail: CI must never silently skip this suite."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the cluster suite cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def control_plane_bin_dir() -> Path:
    build = load_tool_module("build_control_plane")
    bin_dir: Path = build.bin_dir()
    missing = build.missing_binaries(bin_dir)
    if missing:
        _unavailable(
            f"control plane binaries {', '.join(missing)} are not built in {bin_dir}; "
            "run `python tools/build_control_plane.py` (needs Go)"
        )
    return bin_dir


@pytest.fixture(scope="package")
def control_plane(control_plane_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(control_plane_bin_dir, tmp_path_factory.mktemp("controlplane"))
    try:
        plane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    _running.append(plane)
    try:
        yield plane
    finally:
        _running.remove(plane)
        plane.stop()


@pytest.fixture(scope="session")
def k8s_tools() -> dict[str, Path]:
    fetch = load_tool_module("fetch_k8s_tools")
    try:
        return dict(fetch.ensure_tools())
    except fetch.ToolFetchError as exc:
        _unavailable(f"helm/kubectl unavailable: {exc}")
        raise


def run_tool(
    binary: Path, kubeconfig: Path, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(binary), *args],
        env=environment_with_kubeconfig(kubeconfig),
        capture_output=True,
        text=True,
        input=input,
        timeout=KUBECTL_TIMEOUT_S,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"$ {binary.name} {' '.join(args)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="package")
def kubectl(control_plane: ControlPlane, k8s_tools: dict[str, Path]) -> Kubectl:
    """``kubectl(*args, input=None, check=True)`` as the admin; raises on a non-zero exit if check."""

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_tool(k8s_tools["kubectl"], control_plane.kubeconfig, *args, input=input, check=check)

    return run


@pytest.fixture(scope="package")
def helm(control_plane: ControlPlane, k8s_tools: dict[str, Path]) -> Kubectl:
    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_tool(k8s_tools["helm"], control_plane.kubeconfig, *args, input=input, check=check)

    return run


@pytest.fixture(scope="package")
def crd(kubectl: Kubectl) -> str:
    """The OutboxPublisher CRD applied server-side and Established; returns its name."""
    kubectl("apply", "--server-side", "--field-manager=outbox-tests", "-f", str(CRD_PATH))
    name = "outboxpublishers.outbox.dev"
    # Not `kubectl wait`, and no check of kubectl's exit: while the new CRD has no
    # status.conditions yet, both fail at once ("<nil> is not array or slice"), which a slow API
    # server showed in CI: ask again until the deadline.
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    deadline = time.monotonic() + CRD_ESTABLISHED_TIMEOUT_S
    while kubectl("get", "crd", name, "-o", f"jsonpath={jsonpath}", check=False).stdout != "True":
        if time.monotonic() > deadline:
            raise AssertionError(f"CRD {name} not Established within {CRD_ESTABLISHED_TIMEOUT_S}s")
        time.sleep(0.2)
    # kubectl caches discovery (taken before the CRD existed): refresh it, as a user would have to
    listed = kubectl("api-resources", "--api-group=outbox.dev", "--no-headers").stdout.split()
    assert listed[:2] == ["outboxpublishers", "obp"], listed
    return name


@pytest.fixture
def namespace(kubectl: Kubectl, control_plane: ControlPlane) -> Iterator[str]:
    """A new namespace ``t-<hex>`` for one test; deleted after it (without waiting for it to go)."""
    name = f"t-{secrets.token_hex(4)}"
    kubectl("create", "namespace", name)
    _wait_for_default_service_account(kubectl, name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def _wait_for_default_service_account(kubectl: Kubectl, namespace: str, timeout: float = 30.0) -> None:
    """The service-account controller creates ``default``; pods are refused until it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"serviceaccount default never appeared in {namespace}")


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[KubeApi]:
    """An async client authenticated as the admin."""
    async with KubeApi(control_plane.server, control_plane.admin_token, control_plane.ca_file) as client:
        yield client
