"""Issue 11: mutated recipes through `lilt train` end in a one-line error naming the key, or a valid run.

The fuzzer itself lives in fuzz.py (`python tests/reliability/fuzz.py recipes` prints the table).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

import fuzz


def test_recipe_cases_are_reproducible_and_declared(tmp_path: Path) -> None:
    cases = fuzz.recipe_cases(tmp_path, seed=fuzz.DEFAULT_SEED)
    assert [c.id for c in cases] == [c.id for c in fuzz.recipe_cases(tmp_path, seed=fuzz.DEFAULT_SEED)]
    assert len(cases) >= 250
    assert not [i for i, n in collections.Counter(c.id for c in cases).items() if n > 1]
    for case in cases:
        assert case.ok and set(case.ok) <= {"reject", "run"}, case.id
        assert case.names or not case.invalid, f"{case.id}: an invalid mutation must say what its error names"
    assert sum(c.invalid for c in cases) > len(cases) // 2


@pytest.mark.slow
def test_recipe_fuzzer(tmp_path: Path) -> None:
    cases, results, seconds = fuzz.run_fuzzer("recipes", tmp_path)
    print(f"\n{len(cases)} recipes in {seconds:.0f} s\n" + fuzz.table(results))
    bad = [r for r in results if r.outcome in fuzz.BAD]
    print(fuzz.problems(results))
    found = fuzz.counts(results)
    assert found["tracebacks"] == 0 and found["accepted silently"] == 0 and found["hangs"] == 0, fuzz.problems(bad)
    assert found["unclear errors"] == 0 and found["rejected valid"] == 0, fuzz.problems(bad)
