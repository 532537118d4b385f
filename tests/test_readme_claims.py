"""What the docs say about the tests is true: the Errors table's counts (docs/errors.md) are the collected cases."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

from conftest import REPO

ERRORS_PAGE = REPO / "docs" / "errors.md"  # the Errors section of the README, moved to its own page


def errors_table() -> list[tuple[int, list[str]]]:
    """(cases, [test ids]) of each row of the Errors page's bad-input table."""
    errors = ERRORS_PAGE.read_text()
    rows = [line.split(" | ") for line in errors.splitlines() if line.startswith("| ") and "::" in line]
    return [(int(cases), re.findall(r"`([\w/]+\.py::\w+)`", tests)) for _, cases, tests in rows]


def collected_cases() -> Counter:
    """How many cases pytest collects for each `file::function` of the suite."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=300).stdout
    return Counter(re.sub(r"\[.*$", "", line).removeprefix("tests/") for line in out.splitlines() if "::" in line)


def test_the_errors_tables_counts_are_the_suites():
    table, cases = errors_table(), collected_cases()
    assert len(table) >= 10
    for count, tests in table:
        assert tests and all(cases[t] for t in tests), [t for t in tests if not cases[t]]  # every test exists
        assert sum(cases[t] for t in tests) == count, (count, {t: cases[t] for t in tests})
    total = int(re.search(r"\*\*(\d+) bad inputs and faults\*\* in all", ERRORS_PAGE.read_text())[1])
    assert total == sum(count for count, _ in table) >= 60
