"""Lines the benchmarks report after pytest-benchmark's tables: ratios measured in the run against
their targets (a ratio needs two benchmarks, and the tables show one at a time)."""
import pytest

_LINES = []


@pytest.fixture(scope="session")
def report():
    """report(line): print ``line`` in the "targets" section at the end of the run."""
    return _LINES.append


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("targets")
        for line in _LINES:
            terminalreporter.write_line(line)
