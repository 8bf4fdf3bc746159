"""`tune_gc`: what a relay process does to Python's cyclic garbage collector once it has started.

Run in a subprocess each: the tuning is process-wide and must not leak into the test process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_start_up_state_is_frozen_and_the_youngest_generation_waits_longer() -> None:
    out = run(
        """
        import gc
        from outbox_cli.main import GC_GEN0_THRESHOLD, tune_gc
        before = gc.get_threshold()
        tune_gc()
        after = gc.get_threshold()
        print(gc.get_freeze_count() > 1000, after[0] == GC_GEN0_THRESHOLD > before[0], after[1:] == before[1:])
        """
    )
    assert out == "True True True"


def test_cycles_made_after_the_tuning_are_still_collected_on_their_own() -> None:
    """No leak: garbage cycles made while the relay runs are freed by the collector's automatic
    runs (no explicit gc.collect), within the threshold's bound of allocations."""
    out = run(
        """
        import gc, weakref
        from outbox_cli.main import GC_GEN0_THRESHOLD, tune_gc
        tune_gc()
        freed = []
        class Node:
            pass
        for i in range(100):
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: reference counting alone never frees it
            weakref.finalize(a, freed.append, i)
            del a, b
        keep = [[] for _ in range(3 * GC_GEN0_THRESHOLD)]  # allocations that trigger collections
        print(len(freed))
        """
    )
    assert out == "100"
