"""Side-by-side benchmark harness: every variant of a case is timed in the same run, and the session
ends with a table of ratios (speed-up over `naive`, ratio to the dense floor, TFLOP/s and its
share of a dense matmul measured in the same run on the same device), printed and saved as
JSON (benchmarks/results-<device>.json, or $M2DINO_BENCH_JSON).

Each test times one (case, variant) with pytest-benchmark and records it here; the
`test_targets_*` tests at the end of each file assert the issue's ratio targets from what was
recorded, so a missed target is a red benchmark, not a silent number.

Cases do not inherit each other's allocator state. On CPU, tensors come from glibc's malloc,
which by default returns large blocks to the kernel on free (mmap'd blocks, and the heap top
past a trim threshold that it re-tunes from what was freed before): a variant's timed rounds
then pay a page fault per 4 KiB of every fresh buffer (~40k faults per ViT-B MoE step), and
how many depends on what ran earlier -- after the `naive` loops had freed GBs of
zero-filled gradients, cpp at ViT-B/L read 1.58x/1.79x dense in a full run against
1.08x/1.34x alone. `pin_cpu_allocator()` (at import) makes malloc keep and reuse freed memory
(no mmap for large blocks, no automatic trimming), as PyTorch's caching allocator does on
GPU, and `between_cases()` (before every test) collects garbage and trims the heap, so every
case starts from the same state and its warm-up round faults in what its timed rounds reuse.
"""
import ctypes
import ctypes.util
import gc
import itertools
import json
import os
import platform
import subprocess
import tempfile
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

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def pin_cpu_allocator() -> bool:
    """glibc: serve every block from the heap (M_MMAP_MAX = 0) and never trim it on free
    (M_TRIM_THRESHOLD = max), so freed memory is reused without page faults and the policy
    does not drift with what was freed before. False where there is no glibc mallopt."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_MAX, 0)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)))


def between_cases() -> None:
    """Start a case from a clean slate: garbage collected, the heap trimmed (glibc), the CUDA
    cache emptied."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# M2DINO_BENCH_ALLOCATOR=default keeps glibc's own policy (to see the difference)
ALLOCATOR_PINNED = (DEVICE == "cpu" and os.environ.get("M2DINO_BENCH_ALLOCATOR") != "default"
                    and pin_cpu_allocator())


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


_TUNE_DIR = tempfile.mkdtemp(prefix="m2dino-bench-autotune-")
_TUNE_FILES = itertools.count()


def autotuned(fn):
    """(run, tuner): run() calls fn with a fresh autotuner installed that measures this
    device (its own cache file: decisions made in this run, nothing inherited)."""
    from m2dino_kernels import autotune  # noqa: PLC0415

    tuner = autotune.Autotuner(device_types=(DEVICE,),
                               path=os.path.join(_TUNE_DIR, f"{next(_TUNE_FILES)}.json"))

    def run():
        previous, autotune.TUNER = autotune.TUNER, tuner
        try:
            return fn()
        finally:
            autotune.TUNER = previous

    return run, tuner


def choices(tuner) -> dict:
    """What a tuner decided: choice_<op> = backend, tuned_ms_<op> = each candidate's time,
    excluded_<op> = {backend: error} (to go into a measurement's extra)."""
    out = {}
    for key, entry in ({} if tuner is None else tuner.entries()).items():
        op = key.split("|")[0]
        out[f"choice_{op}"] = entry["backend"]
        out[f"tuned_ms_{op}"] = entry["ms"]
        if entry.get("excluded"):
            out[f"excluded_{op}"] = entry["excluded"]
    return out


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


def note(row) -> str:
    """The autotuner's choice (auto rows) or the host syncs of a step (training rows)."""
    parts = [f"{op}={row[key]}" for op, key in (("route", "choice_task_topk_route"),
                                               ("experts", "choice_expert_mlp"),
                                               ("attention", "choice_attention")) if key in row]
    if "host_syncs" in row:
        parts.append(f"host syncs {row['host_syncs']} ({row['tasks_present']} tasks)")
    return ", ".join(parts)


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
                  f"{'TFLOP/s':>8s} {'%peak':>6s} {'items/s':>9s}  note")
    for r in rows:
        tr.write_line(
            f"{r['case']:44s} {r['variant']:14s} {_fmt(r['ms'], '10.3f')} "
            f"{_fmt(r['speedup_vs_naive'], '8.2f')} {_fmt(r['ratio_to_dense_floor'], '7.3f')} "
            f"{_fmt(r['tflops'], '8.3f')} "
            f"{_fmt(r['share_of_matmul_peak'] and 100 * r['share_of_matmul_peak'], '6.1f')} "
            f"{_fmt(r['per_second'], '9.1f')}  {note(r)}")
    path = os.environ.get("M2DINO_BENCH_JSON") or os.path.join(
        os.path.dirname(__file__), f"results-{DEVICE}.json")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    payload = {"device": device_name(), "torch": torch.__version__, "commit": commit,
               "matmul_peak_tflops": matmul_peak(), "cpu_allocator_pinned": ALLOCATOR_PINNED,
               "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "rows": rows}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    tr.write_line(f"saved {path}")


def markdown_table(payload) -> str:
    """The saved JSON summary as a Markdown table (for RESULTS.md)."""
    lines = [f"Device: {payload['device']} · torch {payload['torch']} · commit {payload['commit']}",
             "", "| case | variant | ms | × naive | / dense | TFLOP/s | % matmul | items/s | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in payload["rows"]:
        share = r["share_of_matmul_peak"]
        lines.append("| " + " | ".join([
            r["case"], r["variant"], _fmt(r["ms"], "1.1f"), _fmt(r["speedup_vs_naive"], "1.2f"),
            _fmt(r["ratio_to_dense_floor"], "1.3f"), _fmt(r["tflops"], "1.3f"),
            _fmt(share and 100 * share, "1.0f"), _fmt(r["per_second"], "1.1f"),
            note(r) or "-"]).replace("  ", " ") + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python benchmarks/harness.py benchmarks/results-cpu.json
    import sys
    with open(sys.argv[1]) as f:
        print(markdown_table(json.load(f)))
