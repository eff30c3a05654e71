"""pytest plumbing for the benchmarks; the harness itself is harness.py."""
import resource
import time

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
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        # page faults per call (warm-up included): the allocator's share of a CPU time
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (rounds + warmup)
        RESULTS.setdefault(case, {})[variant] = Measurement(
            case, variant, benchmark.stats.stats.min, flops, items,
            {**extra, "page_faults_per_call": round(faults)})

    return run


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.fixture
def measure_peers():
    """measure_peers(case, {variant: fn}, flops=0, rounds=5): time the variants of one case
    round-robin -- every round runs each variant once, in an order rotated round by round --
    and record each one's fastest round. Peers then share the machine's state (its other
    load, clock and allocator), instead of each seeing what happened to be going on during
    its own few seconds; the comparisons between them are what the targets assert."""

    def run(case, fns, flops=0.0, rounds=5, warmup=1):
        names = list(fns)
        best = dict.fromkeys(names, float("inf"))
        faults = dict.fromkeys(names, 0)
        for name in names:
            for _ in range(warmup):
                fns[name]()
            synchronize()
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start_faults = _faults()
                start = time.perf_counter()
                fns[name]()
                synchronize()
                best[name] = min(best[name], time.perf_counter() - start)
                faults[name] += _faults() - start_faults
        for name in names:
            RESULTS.setdefault(case, {})[name] = Measurement(
                case, name, best[name], flops, 0.0,
                {"page_faults_per_call": round(faults[name] / rounds), "rounds": rounds,
                 "round_robin": True})

    return run


def pytest_terminal_summary(terminalreporter):
    write_summary(terminalreporter)
