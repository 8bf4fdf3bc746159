#!/usr/bin/env python3
"""Build a pinned Kubernetes control plane (kube-apiserver, kube-controller-manager, etcd) from Go modules.

The ``cluster`` tests (tests/cluster/) run the real Kubernetes API server, controller manager and etcd
as local processes on loopback. No package registry reachable here ships those binaries, but
Kubernetes and etcd publish their source as Go modules, so this script builds them with ``go build``
(Go is a build tool of the test suite only; the product stays pure Python).

What it guarantees:

* The binaries land in ``<cache>/<key>/bin/{kube-apiserver,kube-controller-manager,etcd}`` where
  ``<cache>`` is ``$OUTBOX_CONTROLPLANE_CACHE`` or ``~/.cache/outbox-controlplane`` and ``<key>`` names
  both pinned versions (:func:`version_key`), so two pins never share a directory and nothing is
  written inside the repository.
* A second run is a no-op: binaries that exist and report the pinned versions are kept (seconds).
* Each binary is replaced atomically, only after its build succeeded; concurrent runs serialise on a
  lock file in the cache directory.
* Without ``go`` (looked up as ``$GO``, then ``PATH``, then ``/usr/local/go/bin/go``) it exits with
  :data:`EXIT_NO_GO` and says how to get Go; any other failure exits 1 with the failing command's
  output tail.

Known trap it handles: ``k8s.io/kubernetes`` requires its ~30 staging modules (``k8s.io/api``,
``k8s.io/client-go``, ...) at ``v0.0.0``, which does not exist on the module proxy. The build module
therefore carries ``replace k8s.io/X => k8s.io/X v0.N.P`` for every one of them, generated from the
downloaded kubernetes go.mod, all at the release matching ``v1.N.P``. etcd is built in a module of
its own because its dependency graph (grpc, otel, ...) pins other versions than Kubernetes'.

A cold build (empty Go module and build caches) downloads ~600 MB of modules and compiles for tens
of minutes on 2 cores; see README.md "Running the tests" for the measured time.

Usage::

    python tools/build_control_plane.py            # build or reuse; prints the bin directory
    python tools/build_control_plane.py --print-bin-dir   # only print where the binaries go
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.17"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"  # its root package is etcd's main
CACHE_ENV = "OUTBOX_CONTROLPLANE_CACHE"
EXIT_NO_GO = 3
GO_FALLBACK = "/usr/local/go/bin/go"  # where the official tarball installs it, often not on PATH

# Bounds: module downloads and tidy are network-bound, builds CPU-bound on small machines.
DOWNLOAD_TIMEOUT_S = 30 * 60
BUILD_TIMEOUT_S = 90 * 60
VERSION_PROBE_TIMEOUT_S = 30
OUTPUT_TAIL_LINES = 40

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager")
ALL_BINARIES = (*K8S_BINARIES, "etcd")

# Same module name and layout as the first probe build, so Go's build cache is shared with it.
K8S_BUILD_MODULE = "outbox.dev/controlplane"
ETCD_BUILD_MODULE = "outbox.dev/controlplane-etcd"
STAGING_REQUIRE = re.compile(r"^\s+(k8s\.io/\S+) v0\.0\.0\s*$", re.MULTILINE)


class BuildError(RuntimeError):
    """The control plane could not be built; the message says which step failed and why."""


class GoMissingError(BuildError):
    """No Go toolchain was found."""


def version_key() -> str:
    """The cache sub-directory for the pinned versions, e.g. ``v1.35.4-etcd-v3.6.17``."""
    return f"{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def cache_root() -> Path:
    """``$OUTBOX_CONTROLPLANE_CACHE`` or ``~/.cache/outbox-controlplane``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "outbox-controlplane"


def bin_dir() -> Path:
    """Where the three binaries of the pinned versions live (whether built yet or not)."""
    return cache_root() / version_key() / "bin"


def expected_version_marker(binary: str) -> str:
    """A string ``<binary> --version`` prints when it is the pinned build."""
    if binary == "etcd":
        return f"etcd Version: {ETCD_VERSION.removeprefix('v')}"
    return f"Kubernetes {KUBERNETES_VERSION}"


def binary_is_current(path: Path) -> bool:
    """True when ``path`` is an executable that reports the pinned version."""
    if not path.is_file() or not os.access(path, os.X_OK):
        return False
    try:
        result = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=VERSION_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return expected_version_marker(path.name) in result.stdout + result.stderr


def missing_binaries(directory: Path | None = None) -> list[str]:
    """Names of the binaries absent from (or stale in) ``directory`` (default :func:`bin_dir`)."""
    directory = directory or bin_dir()
    return [name for name in ALL_BINARIES if not binary_is_current(directory / name)]


def find_go() -> str:
    """The go executable: ``$GO``, then ``PATH``, then ``/usr/local/go/bin/go``; GoMissingError if none."""
    candidates = [os.environ.get("GO"), shutil.which("go"), GO_FALLBACK]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise GoMissingError(
        "no Go toolchain: `go` is not on PATH, $GO is unset and /usr/local/go/bin/go does not exist. "
        "Install Go 1.25 or newer (https://go.dev/dl/) or set GO=/path/to/go; the cluster tests skip "
        "without it (and fail with CI=true)."
    )


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-OUTPUT_TAIL_LINES:])


def run_go(go: str, args: list[str], cwd: Path, timeout_s: int) -> str:
    """Run ``go ARGS`` in ``cwd``; return stdout, raise BuildError with the output tail on failure."""
    started = time.monotonic()
    try:
        result = subprocess.run([go, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"`go {' '.join(args)}` in {cwd} did not finish within {timeout_s}s") from exc
    if result.returncode != 0:
        output = _tail(result.stderr or result.stdout)
        raise BuildError(f"`go {' '.join(args)}` in {cwd} failed (exit {result.returncode}):\n{output}")
    print(f"  go {args[0]} {args[1] if len(args) > 1 else ''} ok in {time.monotonic() - started:.0f}s", flush=True)
    return result.stdout


def staging_replaces(kubernetes_go_mod: str, staging_version: str) -> list[str]:
    """One ``replace`` line per ``k8s.io/*`` module that kubernetes' go.mod requires at ``v0.0.0``."""
    modules = sorted(set(STAGING_REQUIRE.findall(kubernetes_go_mod)))
    if not modules:
        raise BuildError("kubernetes' go.mod lists no k8s.io/* staging module at v0.0.0; the pin needs review")
    return [f"\t{module} => {module} {staging_version}" for module in modules]


def kubernetes_go_mod(go: str, work: Path) -> str:
    """The text of ``k8s.io/kubernetes@KUBERNETES_VERSION``'s go.mod, downloaded through the module proxy."""
    out = run_go(go, ["mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], work, DOWNLOAD_TIMEOUT_S)
    go_mod_path = json.loads(out)["GoMod"]
    return Path(go_mod_path).read_text()


def write_module(directory: Path, module: str, go_mod_body: str, imports: list[str]) -> None:
    """Write go.mod and a tools.go that imports ``imports`` (build tag ``tools``, so only tidy sees it)."""
    directory.mkdir(parents=True, exist_ok=True)
    go_mod = f"module {module}\n\ngo 1.25.0\n\n{go_mod_body}"
    template = directory / ".go.mod.in"  # what we wrote before `go mod tidy` rewrote go.mod
    if not template.is_file() or template.read_text() != go_mod or not (directory / "go.mod").is_file():
        (directory / "go.mod").write_text(go_mod)
        template.write_text(go_mod)
    lines = "\n".join(f'\t_ "{path}"' for path in imports)
    (directory / "tools.go").write_text(f"//go:build tools\n\npackage controlplane\n\nimport (\n{lines}\n)\n")


def prepare_kubernetes_module(go: str, directory: Path) -> None:
    """The build module for kube-apiserver and kube-controller-manager, staging replaces included."""
    directory.mkdir(parents=True, exist_ok=True)
    staging_version = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    replaces = staging_replaces(kubernetes_go_mod(go, directory), staging_version)
    body = f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n" + "\n".join(replaces) + "\n)\n"
    write_module(directory, K8S_BUILD_MODULE, body, [f"k8s.io/kubernetes/cmd/{name}" for name in K8S_BINARIES])
    print(f"  {len(replaces)} staging modules replaced at {staging_version}", flush=True)
    run_go(go, ["mod", "tidy"], directory, DOWNLOAD_TIMEOUT_S)


def prepare_etcd_module(go: str, directory: Path) -> None:
    """The build module for etcd (its own dependency graph)."""
    write_module(directory, ETCD_BUILD_MODULE, f"require {ETCD_MODULE} {ETCD_VERSION}\n", [ETCD_MODULE])
    run_go(go, ["mod", "tidy"], directory, DOWNLOAD_TIMEOUT_S)


def kubernetes_ldflags() -> str:
    """Strip symbols and stamp the version, so /version says v1.35.4 (helm checks a chart's kubeVersion)."""
    minor = KUBERNETES_VERSION.split(".")[1]
    stamp = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": "1",
        "gitMinor": minor,
        "gitTreeState": "clean",
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in stamp.items()]
    return " ".join(flags)


def build_into(go: str, module_dir: Path, targets: dict[str, str], ldflags: str, dest: Path) -> None:
    """``go build`` each package of ``targets`` (binary name -> package) and move it into ``dest``."""
    out = module_dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for name, package in targets.items():
        print(f"building {name} ({package}) ...", flush=True)
        args = ["build", "-trimpath", f"-ldflags={ldflags}", "-o", str(out / name), package]
        run_go(go, args, module_dir, BUILD_TIMEOUT_S)
        os.replace(out / name, dest / name)
        if not binary_is_current(dest / name):
            raise BuildError(f"{dest / name} was built but does not report {expected_version_marker(name)!r}")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_control_plane() -> Path:
    """Build whatever pinned binary is missing and return the bin directory holding all three."""
    dest = bin_dir()
    if not missing_binaries(dest):
        print(f"control plane {version_key()} already built: {dest}", flush=True)
        return dest
    go = find_go()
    key_dir = dest.parent
    with _locked(key_dir):
        dest.mkdir(parents=True, exist_ok=True)
        missing = missing_binaries(dest)  # another run may have finished while we waited
        started = time.monotonic()
        if "etcd" in missing:
            print(f"etcd {ETCD_VERSION}: preparing module in {key_dir / 'etcd-module'}", flush=True)
            prepare_etcd_module(go, key_dir / "etcd-module")
            build_into(go, key_dir / "etcd-module", {"etcd": ETCD_MODULE}, "-s -w", dest)
        k8s_targets = {name: f"k8s.io/kubernetes/cmd/{name}" for name in K8S_BINARIES if name in missing}
        if k8s_targets:
            print(f"kubernetes {KUBERNETES_VERSION}: preparing module in {key_dir / 'k8s-module'}", flush=True)
            prepare_kubernetes_module(go, key_dir / "k8s-module")
            build_into(go, key_dir / "k8s-module", k8s_targets, kubernetes_ldflags(), dest)
        print(f"control plane {version_key()} built in {time.monotonic() - started:.0f}s: {dest}", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--print-bin-dir", action="store_true", help="print the bin directory and exit")
    args = parser.parse_args(argv)
    if args.print_bin_dir:
        print(bin_dir())
        return 0
    try:
        ensure_control_plane()
    except GoMissingError as exc:
        print(f"build_control_plane: {exc}", file=sys.stderr)
        return EXIT_NO_GO
    except BuildError as exc:
        print(f"build_control_plane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
