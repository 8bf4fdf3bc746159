"""The Dockerfile: hadolint-clean, multi-stage, non-root, no build tools at run time, pinned wheels.

No Docker engine runs in CI, so these are static checks; the kind suite builds the image for real.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import chartchecks as cc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = cc.ROOT / "Dockerfile"
LOCK = cc.ROOT / "tools" / "image" / "requirements.txt"
BUILD_LOCK = cc.ROOT / "tools" / "image" / "build-requirements.txt"


def stages(text: str) -> list[list[str]]:
    """Instructions per stage (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip --require-hashes file."""
    text = re.sub(r"\\\n\s*", " ", lock.read_text())
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        spec, *rest = line.split()
        name, _, version = spec.partition("==")
        out[canonicalize_name(name)] = (version, [h.removeprefix("--hash=sha256:") for h in rest])
    return out


def test_hadolint_clean(hadolint_bin: Path) -> None:
    assert cc.hadolint(hadolint_bin, DOCKERFILE, cc.ROOT / ".hadolint.yaml") == []


def test_multi_stage_non_root_without_build_tools() -> None:
    parts = stages(DOCKERFILE.read_text())
    assert len(parts) >= 2, "builder and runtime stages"
    final = parts[-1]
    final_text = "\n".join(final)
    users = [i for i in final if i.upper().startswith("USER ")]
    assert users, "the final stage must set USER"
    user = users[-1].split()[1].split(":")[0]
    assert user.isdigit(), "numeric USER, so the kubelet can verify runAsNonRoot"
    assert int(user) != 0
    for forbidden in ("apt-get", "apk ", "gcc", "build-essential", "pip install", "pip wheel", "make "):
        assert forbidden not in final_text, f"{forbidden!r} in the runtime stage"
    assert re.search(r"COPY --from=builder /opt/venv /opt/venv", final_text)
    assert "pip uninstall" in final_text, "no pip in the runtime image"
    builder = "\n".join(parts[0])
    assert "--require-hashes" in builder
    assert "--only-binary=:all:" in builder


def test_base_image_is_pinned_and_slim() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert match, "the base image is one ARG"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", match.group(1))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms
    assert all(f == "${PYTHON_IMAGE}" for f in froms)


def test_image_lock_satisfies_pyproject() -> None:
    project = tomllib.loads((cc.ROOT / "pyproject.toml").read_text())
    locked = pins(LOCK)
    for dep in project["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} missing from {LOCK.name}: run tools/lock_image.py"
        version, hashes = locked[name]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} does not satisfy {dep}"
        assert hashes, name
    for name, (version, hashes) in {**locked, **pins(BUILD_LOCK)}.items():
        assert version, name
        assert hashes, f"{name} has no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    build = [Requirement(r) for r in project["build-system"]["requires"]]
    build_locked = pins(BUILD_LOCK)
    for req in build:
        assert canonicalize_name(req.name) in build_locked
        assert req.specifier.contains(build_locked[canonicalize_name(req.name)][0])


def test_lock_targets_the_images_python() -> None:
    match = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)", DOCKERFILE.read_text(), re.M)
    assert match
    assert f"(CPython {match.group(1)}," in LOCK.read_text().splitlines()[0]


def test_dockerignore_is_an_allow_list_covering_every_copy() -> None:
    lines = [line.strip() for line in (cc.ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    assert lines[0] == "*", "start from nothing"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copies = re.findall(r"^COPY (?!--from)(.+)$", re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()), re.M)
    for copy in copies:
        for src in copy.split()[:-1]:
            src = src.rstrip("/")
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by .dockerignore"
            assert (cc.ROOT / src).exists() or src == "README.md", f"{src} does not exist"


def test_image_carries_no_embedded_servers_and_the_cli_says_so() -> None:
    """The image holds the operator and the worker: the dev kit's 'embedded' extra (PostgreSQL and
    nats-server binaries for `outboxctl demo`/`bench`) is not in its lock, and those commands name
    the extra instead of failing (tests/unit/test_cli.py runs them without it)."""
    project = tomllib.loads((cc.ROOT / "pyproject.toml").read_text())
    locked = pins(LOCK)
    extra = project["project"]["optional-dependencies"]["embedded"]
    assert extra
    for dep in extra:
        assert canonicalize_name(Requirement(dep).name) not in locked, f"{dep} is in the image lock"
