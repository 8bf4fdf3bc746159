#!/usr/bin/env python3
"""Copy the canonical CRDs from ``crds/`` into the Helm chart's ``crds/``, or check they are equal.

``crds/*.yaml`` at the repository root is the source of truth (the operator's tests prove it matches
the pydantic spec). The chart ships a byte-identical copy because Helm only installs CRDs from a
directory inside the chart. Run after editing a CRD::

    .venv/bin/python tools/sync_chart_crd.py           # copy
    .venv/bin/python tools/sync_chart_crd.py --check   # exit 1 and name the drifted files

The chart test ``test_chart_crds_identical_to_canonical`` runs the same comparison.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "crds"
CHART_CRDS = ROOT / "helm" / "outbox-operator" / "crds"


def drift(source: Path = SOURCE, target: Path = CHART_CRDS) -> list[str]:
    """Human-readable differences between the two directories' ``*.yaml`` files; empty when equal."""
    problems = []
    src = {p.name: p for p in sorted(source.glob("*.yaml"))}
    dst = {p.name: p for p in sorted(target.glob("*.yaml"))} if target.is_dir() else {}
    if not src:
        problems.append(f"{source}: no CRD files")
    for name in sorted(src.keys() - dst.keys()):
        problems.append(f"{target / name}: missing (copy of {src[name]})")
    for name in sorted(dst.keys() - src.keys()):
        problems.append(f"{dst[name]}: not in {source} (stale copy)")
    for name in sorted(src.keys() & dst.keys()):
        if src[name].read_bytes() != dst[name].read_bytes():
            problems.append(f"{dst[name]}: differs from {src[name]}")
    return problems


def sync(source: Path = SOURCE, target: Path = CHART_CRDS) -> list[str]:
    """Make ``target`` hold exactly the ``*.yaml`` files of ``source``; return what changed."""
    target.mkdir(parents=True, exist_ok=True)
    changed = drift(source, target)
    for stale in target.glob("*.yaml"):
        if not (source / stale.name).exists():
            stale.unlink()
    for path in source.glob("*.yaml"):
        shutil.copyfile(path, target / path.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sync or check the chart's copy of crds/.")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for line in problems:
            print(f"drift: {line}", file=sys.stderr)
        if problems:
            print("run: python tools/sync_chart_crd.py", file=sys.stderr)
        return 1 if problems else 0
    for line in sync():
        print(f"synced: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
