"""``outboxctl operator`` as a subprocess against the API emulator (marker ``operator``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import crd_schema
import pytest
import yaml
from kube_emulator import KubeEmulator
from opkit import NAMESPACE

from support.polling import wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


def outboxctl() -> list[str]:
    found = shutil.which("outboxctl", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "outbox_cli"]


async def test_outboxctl_operator_all_namespaces_json_logs(emulator: KubeEmulator, tmp_path: Path) -> None:
    await emulator.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "billing"}})
    for ns, example in ((NAMESPACE, "outboxpublisher.yaml"), ("billing", "outboxpublisher-minimal.yaml")):
        cr = yaml.safe_load((crd_schema.ROOT / "examples" / example).read_text())
        cr["metadata"]["namespace"] = ns
        secret = cr["spec"]["database"]["secretRef"]["name"]
        await emulator.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": secret, "namespace": ns},
                "data": {"url": base64.b64encode(b"postgresql://u:p@db/x").decode()},
            }
        )
        await emulator.apply(cr)

    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *outboxctl(),
            "operator",
            "--all-namespaces",
            "--log-format",
            "json",
            "--resync-seconds",
            "1",
            "--worker-image",
            "relay:cli-test",
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ},
        )
        try:
            orders = await wait_for(lambda: emulator.get("apps/v1", "Deployment", NAMESPACE, "orders-relay"), 40)
            billing = await wait_for(lambda: emulator.get("apps/v1", "Deployment", "billing", "billing-relay"), 40)
            for dep in (orders, billing):
                assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "relay:cli-test"

            def observed() -> bool:
                cr = emulator.get("outbox.dev/v1alpha1", "OutboxPublisher", "billing", "billing")
                return bool(cr and (cr.get("status") or {}).get("observedGeneration") == 1)

            await wait_for(observed, 40)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-3000:]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert "postgresql://" not in output


async def exit_of(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Exit code and stderr of ``outboxctl operator`` with ``args``, which must end within 30 s (it
    is killed otherwise, and the test fails saying so)."""
    proc = await asyncio.create_subprocess_exec(
        *outboxctl(), "operator", *args, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"`outboxctl operator {' '.join(args)}` did not exit within 30 s") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_outboxctl_operator_requires_a_scope() -> None:
    code, err = await exit_of()
    assert code == 2
    assert "--namespace" in err


async def test_outboxctl_operator_without_credentials_exits_with_one_line(tmp_path: Path) -> None:
    """Neither a service account nor a kubeconfig: exit 3 at once with the fix, not kopf's login
    traceback repeated every 60 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env |= {"KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "HOME": str(tmp_path)}
    code, text = await exit_of("-A", env=env)
    assert code == 3, text
    assert "no Kubernetes API credentials" in text
    assert "missing-kubeconfig" in text
    assert "set KUBECONFIG" in text
    assert "Traceback" not in text


def without_credentials(tmp_path: Path) -> dict[str, str]:
    """An environment with no API credentials: a flag the operator accepts ends it with code 3 at
    once, so a test of a flag it must refuse (code 2) never waits for an API server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    return env | {"KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "HOME": str(tmp_path)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def kubeconfig_for(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--liveness", "foo"),  # kopf: Exception "Unsupported scheme", exit 1
        ("--liveness", "https://0.0.0.0:8080/healthz"),  # kopf serves plain http only
        ("--liveness", "http://0.0.0.0:abc/healthz"),  # kopf: ValueError traceback
        ("--liveness", "http://0.0.0.0:65536/healthz"),
        ("--liveness", "http://0.0.0.0:0/healthz"),  # kopf would serve on port 80
        ("--resync-seconds", "nan"),  # asyncio.sleep(nan) returns at once: the resync would spin
        ("--resync-seconds", "inf"),
        ("--resync-seconds", "0"),
        ("--resync-seconds", "-1"),
        ("--resync-seconds", "1e-6"),  # a pass every microsecond: the operator spins on its resync
        ("--resync-seconds", "0.5"),
        ("--startup-timeout-seconds", "nan"),
        ("--startup-timeout-seconds", "inf"),
        ("--startup-timeout-seconds", "-1"),
        ("--startup-timeout-seconds", "3601"),
    ],
)
async def test_outboxctl_operator_refuses_a_bad_flag_value_naming_the_flag(
    tmp_path: Path, flag: str, value: str
) -> None:
    code, text = await exit_of("-A", f"{flag}={value}", env=without_credentials(tmp_path))
    assert code == 2, text
    assert f"argument {flag}: {value!r}" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "url",
    [
        "http://0.0.0.0:8080/healthz",
        "http://127.0.0.1:9/",
        "http://[::]:8080/healthz",
        "http://localhost/healthz",
        "http://0.0.0.0:8080",
    ],
)
async def test_outboxctl_operator_accepts_the_liveness_urls_kopf_serves(tmp_path: Path, url: str) -> None:
    code, text = await exit_of("-A", "--liveness", url, env=without_credentials(tmp_path))
    assert code == 3, text  # past the flags, stopped by the missing credentials
    assert "no Kubernetes API credentials" in text


async def test_outboxctl_operator_with_its_liveness_port_in_use_exits_3_in_one_line(tmp_path: Path) -> None:
    """kopf's liveness server failing to bind was an OSError traceback and exit 1. The address is
    tried before the API server is waited for (this one never answers)."""
    kubeconfig = kubeconfig_for(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"http://127.0.0.1:{taken.getsockname()[1]}/healthz"
        code, text = await exit_of("-A", "--liveness", url, env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    assert code == 3, text
    assert text.splitlines() == [text.strip()], text
    assert f"--liveness {url}: cannot listen on" in text
    assert "another port" in text
    assert "operator.healthPort" in text


async def test_outboxctl_operator_without_an_api_server_exits_4_within_the_startup_timeout(tmp_path: Path) -> None:
    """An API server that never answers (a closed loopback port): kopf retried for about a minute
    and ended with 234 lines of tracebacks and exit 1. Now each try is one log line, and after
    --startup-timeout-seconds one error line and exit 4."""
    server = f"http://127.0.0.1:{free_port()}"
    kubeconfig = kubeconfig_for(tmp_path / "kubeconfig", server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, text = await exit_of(
        "-A", "--startup-timeout-seconds", "2", env={**os.environ, "KUBECONFIG": str(kubeconfig)}
    )
    elapsed = loop.time() - started
    assert code == 4, text
    assert "Traceback" not in text
    lines = text.splitlines()
    retries = [line for line in lines if "does not answer" in line]
    assert len(retries) >= 2, text
    assert all(server in line for line in retries)
    assert lines[-1].startswith(f"error: the Kubernetes API server at {server} did not answer within 2 s"), text
    assert "--startup-timeout-seconds" in lines[-1]
    assert len(lines) == len(retries) + 1, text
    assert elapsed < 20, elapsed
