"""The user-facing docs say what the code does: the ``OUTBOX_*`` variables, the ``outboxctl`` flags, the
exit codes and the Ready reasons they name exist, and their links resolve. (Metrics, dead-letter
reasons, CRD descriptions and chart values have their checks beside their code: test_metrics.py,
test_policy.py, test_operator_crd.py, tests/chart.)"""

from __future__ import annotations

import argparse
import ast
import re
import signal
from pathlib import Path

import pytest

from outbox_cli import main as cli
from outbox_common.settings import WorkerSettings, env_name

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "outbox-operator"
README = ROOT / "README.md"
# What a user reads: the pages, the chart's README, values and NOTES, the CRD and the examples.
DOCS = sorted(
    [
        README,
        ROOT / "RELIABILITY.md",
        ROOT / "tests" / "README.md",
        *(ROOT / "docs").glob("*.md"),
        CHART / "README.md",
        CHART / "values.yaml",
        CHART / "templates" / "NOTES.txt",
        ROOT / "crds" / "outboxpublisher.yaml",
        *(ROOT / "examples").rglob("*.yaml"),
    ]
)
MARKDOWN = [d for d in DOCS if d.suffix == ".md"]

# OUTBOX_* names in the docs that are no worker setting, and what they are.
NOT_SETTINGS = {
    "OUTBOX_BATCHSIZE": "README's example of a misspelt setting",
    "OUTBOX_BENCH": "the bench's stream",
    "OUTBOX_CONTROLPLANE_CACHE": "tools/build_control_plane.py",
    "OUTBOX_SCALE_JSON": "tests/cluster/test_operator_scale.py",
    "OUTBOX_SCALE_N": "tests/cluster/test_operator_scale.py",
    "OUTBOX_SCALE_REST_SECONDS": "tests/cluster/test_operator_scale.py",
    "OUTBOX_TEST_": "the prefix of the test suite's variables (RELIABILITY.md)",
}


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_outbox_variable_the_docs_name_is_a_setting() -> None:
    settings = {env_name(f) for f in WorkerSettings.model_fields}
    unknown = {
        f"{_doc_id(doc)}: {name}"
        for doc in DOCS
        for name in re.findall(r"\bOUTBOX_[A-Z0-9][A-Z0-9_]*", doc.read_text())
        if name not in settings and name not in NOT_SETTINGS
    }
    assert sorted(unknown) == []


def test_every_setting_is_documented() -> None:
    """In README or in the CRD's descriptions (``kubectl explain``); ``outboxctl worker --help``
    lists them all too (test_cli.py)."""
    text = README.read_text() + (ROOT / "crds" / "outboxpublisher.yaml").read_text()
    missing = [env_name(f) for f in WorkerSettings.model_fields if not re.search(rf"\b{env_name(f)}\b", text)]
    assert missing == []


# --- outboxctl flags --------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _outboxctl_mentions(text: str) -> list[str]:
    """Each ``outboxctl ...`` command line of ``text``: from code blocks (continuation lines joined)
    and from inline code spans."""
    found = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            found += re.findall(r"outboxctl [^#|;&]*", line)
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):
        found += re.findall(r"outboxctl [^#|;&]*", span)
    return found


def unknown_outboxctl_flags(text: str) -> list[str]:
    commands = _subcommands(cli.build_parser([]))
    problems = []
    for mention in _outboxctl_mentions(text):
        words = mention.split()
        parser = commands.get(words[1]) if len(words) > 1 else None
        if parser is None:
            if len(words) > 1 and not words[1].startswith("-"):
                problems.append(f"{mention}: no command {words[1]!r}")
            continue
        rest = words[2:]
        actions = _subcommands(parser)
        if actions and rest and rest[0] in actions:
            parser, rest = actions[rest[0]], rest[1:]
        options = _options(parser)
        for word in rest:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--?[a-zA-Z][-a-zA-Z0-9]*", flag) and flag not in options:
                problems.append(f"{mention}: no flag {flag}")
    return problems


@pytest.mark.parametrize("doc", [*MARKDOWN, CHART / "templates" / "NOTES.txt"], ids=_doc_id)
def test_every_outboxctl_flag_in_the_docs_exists(doc: Path) -> None:
    assert unknown_outboxctl_flags(doc.read_text()) == []


def test_an_outboxctl_flag_that_does_not_exist_is_found() -> None:
    text = (
        "Run `outboxctl migrate --partition 8`, then\n\n```bash\noutboxctl dead-letters list \\\n    --since 1h\n```\n"
    )
    assert unknown_outboxctl_flags(text) == [
        "outboxctl dead-letters list      --since 1h: no flag --since",
        "outboxctl migrate --partition 8: no flag --partition",
    ]


# --- exit codes ---------------------------------------------------------------------------------------


def test_readme_lists_every_exit_code() -> None:
    """README's "Exit codes" paragraph names each code ``outboxctl`` returns, SIGTERM's included."""
    text = README.read_text()
    paragraph = text[text.index("**Exit codes**") :].split("\n\n", 1)[0]
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_") and isinstance(v, int)}
    codes.add(128 + signal.SIGTERM)  # cli._terminated, run_async
    missing = sorted(code for code in codes if not re.search(rf"(:|;) {code} ", " ".join(paragraph.split())))
    assert missing == []


# --- condition reasons ----------------------------------------------------------------------------------


def _condition_reasons(condition_type: str, status: str | None = None) -> set[str]:
    """Reasons the operator sets on a condition: ``Condition(c.<TYPE>, status, "Reason", ...)``, with
    that ``status`` only when given."""
    reasons = set()
    for source in (ROOT / "operator" / "outbox_operator").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Condition"):
                continue
            if len(node.args) < 3:
                continue
            kind, given, reason = node.args[0], node.args[1], node.args[2]
            if status is not None and not (isinstance(given, ast.Constant) and given.value == status):
                continue
            if isinstance(kind, ast.Attribute) and kind.attr == condition_type and isinstance(reason, ast.Constant):
                reasons.add(str(reason.value))
    return reasons


def _unknown_pressure_reasons() -> set[str]:
    """Reasons of an unknown queue pressure (``health.Unknown("Reason", ...)``): Lagging's when Unknown."""
    tree = ast.parse((ROOT / "operator" / "outbox_operator" / "health.py").read_text())
    return {
        str(node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Unknown"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def test_readme_lists_every_ready_reason() -> None:
    """The STATUS column is the Ready condition's reason; README lists them all."""
    text = " ".join(README.read_text().split())
    marker = "`STATUS` the reason of the Ready condition"
    sentence = text[text.index(marker) + len(marker) :].split("), ", 1)[0]
    listed = set(re.findall(r"`([A-Z][A-Za-z]+)`", sentence))
    assert listed == _condition_reasons("READY")


def test_readme_lists_every_reason_the_pressure_is_unknown() -> None:
    text = " ".join(README.read_text().split())
    marker = "the `Lagging` condition then says why"
    sentence = text[text.index(marker) + len(marker) :].split(")", 1)[0]
    listed = set(re.findall(r"`([A-Z][A-Za-z]+)`", sentence))
    assert listed == _unknown_pressure_reasons() | _condition_reasons("LAGGING", "Unknown")


# --- links ------------------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", re.sub(r"[`*]", "", heading).strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


@pytest.mark.parametrize("doc", MARKDOWN, ids=_doc_id)
def test_relative_links_resolve(doc: Path) -> None:
    prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path) if path else doc
        if not linked.exists() or (anchor and (linked.suffix != ".md" or anchor not in _anchors(linked))):
            broken.append(target)
    assert broken == []
