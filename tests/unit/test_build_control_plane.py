"""tools/build_control_plane.py: the build module it writes, where it caches, and what it says without Go."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_tools_build_control_plane", ROOT / "tools" / "build_control_plane.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load()

KUBERNETES_GO_MOD = """module k8s.io/kubernetes

go 1.25.0

require (
\tgithub.com/spf13/cobra v1.10.0
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
\tk8s.io/utils v0.0.0-20251002143259-bc988d571ff4
)

require (
\tk8s.io/kms v0.0.0 // indirect
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
)
"""


def test_every_staging_module_is_replaced_at_the_matching_release() -> None:
    lines = build.staging_replaces(KUBERNETES_GO_MOD, "v0.35.4")
    assert lines == [
        "\tk8s.io/api => k8s.io/api v0.35.4",
        "\tk8s.io/client-go => k8s.io/client-go v0.35.4",
    ]


def test_a_go_mod_without_staging_modules_is_refused() -> None:
    with pytest.raises(build.BuildError, match=r"no k8s\.io/\* staging module"):
        build.staging_replaces("module x\n\nrequire k8s.io/utils v0.0.0-2025\n", "v0.35.4")


def test_cache_dir_is_keyed_by_both_versions_and_can_be_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    assert build.bin_dir() == tmp_path / f"{build.KUBERNETES_VERSION}-etcd-{build.ETCD_VERSION}" / "bin"
    monkeypatch.delenv(build.CACHE_ENV)
    assert build.cache_root() == Path.home() / ".cache" / "outbox-controlplane"


def test_fake_binaries_are_not_taken_for_built_ones(tmp_path: Path) -> None:
    for name in build.ALL_BINARIES:
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\necho 'Kubernetes v0.0.0'\n")
        fake.chmod(0o755)
    assert build.missing_binaries(tmp_path) == list(build.ALL_BINARIES)


def test_without_go_it_exits_3_and_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.setattr(build, "GO_FALLBACK", str(tmp_path / "no-go"))
    assert build.main([]) == build.EXIT_NO_GO
    err = capsys.readouterr().err
    assert "no Go toolchain" in err
    assert "https://go.dev/dl/" in err


def test_kubernetes_binaries_are_stamped_with_the_release() -> None:
    flags = build.kubernetes_ldflags()
    assert f"-X k8s.io/component-base/version.gitVersion={build.KUBERNETES_VERSION}" in flags
    assert "-X k8s.io/component-base/version.gitMinor=35" in flags
