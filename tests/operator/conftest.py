"""Fixtures of the operator suite: the API emulator, a kubeconfig for it, and kopf in-process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file

import crd_schema
from kube_emulator import KubeEmulator
from opkit import NAMESPACE


@pytest.fixture
async def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeEmulator]:
    """A fresh API emulator with the CRD applied, namespace ``shop``, and $KUBECONFIG pointing at it."""
    emu = KubeEmulator()
    await emu.start()
    kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    await emu.apply(crd_schema.load_crd())
    await emu.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    try:
        yield emu
    finally:
        await emu.stop()
