"""pytest plumbing for the benchmarks; the harness itself is harness.py."""
import pytest

from harness import RESULTS, Measurement, between_cases, synchronize, write_summary


@pytest.fixture(autouse=True)
def _clean_slate():
    """Every case starts from the same allocator state (see harness.py)."""
    between_cases()
    yield


@pytest.fixture
def measure(benchmark):
    """measure(case, variant, fn, flops=0, items=0, rounds=5): time fn (synchronised) and record."""

    def run(case, variant, fn, flops=0.0, items=0.0, rounds=5, warmup=1, **extra):
        def timed():
            fn()
            synchronize()

        benchmark.group = case
        benchmark.extra_info.update(case=case, variant=variant, flops=flops, items=items, **extra)
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        RESULTS.setdefault(case, {})[variant] = Measurement(
            case, variant, benchmark.stats.stats.min, flops, items, extra)

    return run


def pytest_terminal_summary(terminalreporter):
    write_summary(terminalreporter)
