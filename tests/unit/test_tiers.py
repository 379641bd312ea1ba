"""The two test tiers are collected together by `bash launch/test.sh`: pytest imports test files by
their base name (there are no packages under tests/), so two files of the same name in different
tiers stop the whole run at collection."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_names_are_unique_across_tiers():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_every_test_file_is_in_a_tier():
    loose = [path.name for path in TESTS.glob("test_*.py")]
    assert loose == [], "test files belong in tests/unit (one process) or tests/integration (processes)"
