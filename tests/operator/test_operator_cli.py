"""``outboxctl operator`` as a subprocess against the API emulator (marker ``operator``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
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
