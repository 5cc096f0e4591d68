"""Shared benchmark plumbing: `bench_report` collects result lines printed at the end of the run.

pytest-benchmark's table shows each timing; ratios between timings of the same run (the goals
of the issues) are added by the suites through `bench_report.add(...)` and printed in the
terminal summary, so they also appear under `--benchmark-only`.
"""
from __future__ import annotations

import pytest


class BenchReport:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.medians: dict[str, float] = {}

    def add(self, line: str) -> None:
        self.lines.append(line)

    def record(self, name: str, benchmark) -> float:
        """Remember the median seconds of a finished `benchmark` under `name`."""
        median = float(benchmark.stats.stats.median)
        self.medians[name] = median
        return median


_REPORT = BenchReport()


@pytest.fixture(scope="session")
def bench_report() -> BenchReport:
    return _REPORT


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORT.lines:
        terminalreporter.section("benchmark ratios")
        for line in _REPORT.lines:
            terminalreporter.write_line(line)
