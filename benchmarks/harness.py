"""Side-by-side benchmark harness: every variant of a case is timed in the same run, and the session
ends with a table of ratios (speed-up over `naive`, ratio to the dense floor, TFLOP/s and its
share of a dense matmul measured in the same run on the same device), printed and saved as
JSON (benchmarks/results-<device>.json, or $M2DINO_BENCH_JSON).

Each test times one (case, variant) with pytest-benchmark and records it here; the
`test_targets_*` tests at the end of each file assert the issue's ratio targets from what was
recorded, so a missed target is a red benchmark, not a silent number.
"""
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Measurement:
    case: str
    variant: str
    seconds: float          # fastest round: the least disturbed by other load on a shared machine
    flops: float = 0.0      # useful floating-point work of one call (0: not a FLOP-bound case)
    items: float = 0.0      # images or samples per call, for throughput cases
    extra: dict = field(default_factory=dict)

    @property
    def tflops(self):
        return self.flops / self.seconds / 1e12 if self.flops else None

    @property
    def per_second(self):
        return self.items / self.seconds if self.items else None


RESULTS: dict[str, dict[str, Measurement]] = {}


def device_name():
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def recorded(case, variant):
    """The measurement of (case, variant) from this run, or skip when it was not measured."""
    m = RESULTS.get(case, {}).get(variant)
    if m is None:
        pytest.skip(f"{case}/{variant} was not measured in this run")
    return m


def matmul_peak():
    """The best dense matmul rate measured in this run on this device (TFLOP/s), if any."""
    rates = [m.tflops for m in RESULTS.get("matmul_peak", {}).values() if m.tflops]
    return max(rates) if rates else None


def _summary_rows():
    peak = matmul_peak()
    rows = []
    for case, variants in RESULTS.items():
        naive = variants.get("naive")
        floor = variants.get("dense")
        for name, m in variants.items():
            rows.append({
                "case": case,
                "variant": name,
                "ms": m.seconds * 1e3,
                "speedup_vs_naive": naive.seconds / m.seconds if naive else None,
                "ratio_to_dense_floor": m.seconds / floor.seconds if floor else None,
                "tflops": m.tflops,
                "share_of_matmul_peak": (m.tflops / peak) if (m.tflops and peak) else None,
                "per_second": m.per_second,
                **m.extra,
            })
    return rows


def _fmt(v, spec):
    width = int(spec.split(".")[0])
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)


def write_summary(terminalreporter):
    if not RESULTS:
        return
    rows = _summary_rows()
    tr = terminalreporter
    tr.section(f"m2dino benchmark ratios on {device_name()}")
    tr.write_line(f"{'case':44s} {'variant':14s} {'ms':>10s} {'x naive':>8s} {'/dense':>7s} "
                  f"{'TFLOP/s':>8s} {'%peak':>6s} {'items/s':>9s}")
    for r in rows:
        tr.write_line(
            f"{r['case']:44s} {r['variant']:14s} {_fmt(r['ms'], '10.3f')} "
            f"{_fmt(r['speedup_vs_naive'], '8.2f')} {_fmt(r['ratio_to_dense_floor'], '7.3f')} "
            f"{_fmt(r['tflops'], '8.3f')} "
            f"{_fmt(r['share_of_matmul_peak'] and 100 * r['share_of_matmul_peak'], '6.1f')} "
            f"{_fmt(r['per_second'], '9.1f')}")
    path = os.environ.get("M2DINO_BENCH_JSON") or os.path.join(
        os.path.dirname(__file__), f"results-{DEVICE}.json")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    payload = {"device": device_name(), "torch": torch.__version__, "commit": commit,
               "matmul_peak_tflops": matmul_peak(), "rows": rows}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    tr.write_line(f"saved {path}")


def markdown_table(payload) -> str:
    """The saved JSON summary as a Markdown table (for RESULTS.md)."""
    lines = [f"Device: {payload['device']} · torch {payload['torch']} · commit {payload['commit']}",
             "", "| case | variant | ms | × naive | / dense | TFLOP/s | % matmul | items/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        share = r["share_of_matmul_peak"]
        lines.append("| " + " | ".join([
            r["case"], r["variant"], _fmt(r["ms"], "1.1f"), _fmt(r["speedup_vs_naive"], "1.2f"),
            _fmt(r["ratio_to_dense_floor"], "1.3f"), _fmt(r["tflops"], "1.3f"),
            _fmt(share and 100 * share, "1.0f"), _fmt(r["per_second"], "1.1f")]).replace("  ", " ") + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python benchmarks/harness.py benchmarks/results-cpu.json
    import sys
    with open(sys.argv[1]) as f:
        print(markdown_table(json.load(f)))
