"""Issue 11: damaged checkpoints through from_pretrained, `lilt eval`, `lilt grow` and resume end in a one-line
error naming the file or key (or, for harmless damage and incomplete newer checkpoints, a correct run), and
never execute planted code or pickles.

The fuzzer itself lives in fuzz.py (`python tests/reliability/fuzz.py checkpoints` prints the table).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

import fuzz


def test_checkpoint_cases_are_declared(tmp_path: Path) -> None:
    cases = fuzz.checkpoint_cases(tmp_path)
    assert len({c.damage for c in cases}) >= 40
    assert not [i for i, n in collections.Counter(c.id for c in cases).items() if n > 1]
    assert {c.surface for c in cases} == {"from_pretrained", "eval", "grow", "resume"}
    for case in cases:
        assert case.ok and set(case.ok) <= {"reject", "run"}, case.id
        assert case.names or not case.invalid, case.id
        if case.surface == "resume" and "run" in case.ok:
            assert case.resumed_from in (1, 2), case.id


@pytest.mark.slow
def test_checkpoint_fuzzer(tmp_path: Path) -> None:
    cases, results, seconds = fuzz.run_fuzzer("checkpoints", tmp_path)
    print(f"\n{len({c.damage for c in cases})} damaged checkpoints, {len(cases)} cases in {seconds:.0f} s\n"
          + fuzz.table(results))
    bad = [r for r in results if r.outcome in fuzz.BAD]
    print(fuzz.problems(results))
    found = fuzz.counts(results)
    assert found["tracebacks"] == 0 and found["accepted silently"] == 0 and found["hangs"] == 0, fuzz.problems(bad)
    assert found["unclear errors"] == 0 and found["rejected valid"] == 0, fuzz.problems(bad)
