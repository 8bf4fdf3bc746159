"""tools/cycle_floor.py, in a tiny run: it starts its own PostgreSQL and nats-server, paces every
variant, prints the figures and writes them as JSON. Speed is reported by the tool, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(180)]

TOOL = Path(__file__).resolve().parents[2] / "tools" / "cycle_floor.py"


def test_the_cycle_floor_tool_reports_each_variant_of_each_round(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    argv = [sys.executable, str(TOOL), "--rounds", "2", "--cycles", "20", "--period", "0.002", "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    figures = json.loads(out.read_text())["us_per_cycle"]
    assert set(figures) == {"timer", "postgres", "jetstream", "both"}
    for name, rounds in figures.items():
        assert len(rounds) == 2, name
        assert all(f > 0 for f in rounds), (name, rounds)
    assert "floor per event:" in proc.stdout
    assert proc.stdout.count("round ") == 2
