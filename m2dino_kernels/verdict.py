"""A backend's self-test verdict: the contract run for it in a child process, with deadlines.

`run_backend(name, device)` starts `python -m m2dino_kernels.selftest --child SPEC` (the checks
of m2dino_kernels.contract for each dtype and op of `plan`), reads the child's events (one
JSON line per op started and done) and returns the verdict: per (dtype, op) pass, wrong (the
worst error), crashed (the signal, or the error's first line: a CUDA error, say) or timed out,
with seconds. A child that dies takes the op it was running with it; the ops after it are
"not run". Nothing the backend does can reach the caller's process.

The timeout is per op (default 600 s on CUDA: the first run compiles and autotunes the
Triton kernels; 300 s elsewhere; $M2DINO_KERNELS_SELFTEST_TIMEOUT), after the child's start
(at most 300 s).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import torch

from m2dino_kernels import autotune, registry

OPS = ("task_topk_route", "expert_mlp", "attention")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
TIMEOUT_ENV = "M2DINO_KERNELS_SELFTEST_TIMEOUT"
STARTUP_TIMEOUT = 300.0
# what ends a backend's verdict, worst first
_SEVERITY = ("crashed", "timed out", "wrong", "not run", "pass")
STATUSES = _SEVERITY[::-1]
CHILD_EVENT = "@m2dino-selftest "  # the prefix of the child's event lines on its stdout


def device_label(device: torch.device) -> str:
    """The device as a verdict names it: the card and its compute capability, or the CPU's
    instruction set."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{autotune.device_name(device)} (cc {major}.{minor})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return device.type


def default_timeout(device_type: str) -> float:
    """Seconds one op may take: $M2DINO_KERNELS_SELFTEST_TIMEOUT, else 600 on CUDA (the
    first run compiles and autotunes the Triton kernels), 300 elsewhere."""
    value = os.environ.get(TIMEOUT_ENV)
    if value:
        return float(value)
    return 600.0 if device_type == "cuda" else 300.0


def default_dtypes(device_type: str) -> tuple:
    return ("fp32", "bf16", "fp16") if device_type == "cuda" else ("fp32",)


@contextlib.contextmanager
def child_environment(device_type: str):
    """What a child sees: Triton's interpreter on CPU (how Triton runs there)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if device_type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def offered_backends(device_type: str) -> list:
    """The compiled backends that can run on `device_type` (on CPU Triton counts: its child
    runs under the interpreter)."""
    with child_environment(device_type):
        return [name for name in registry.compiled_backends()
                if registry.backend(name).runs_on(device_type)]


def plan(name: str, device: torch.device, dtypes=None) -> list:
    """[(dtype name, op)] the self-test runs for backend `name` on `device`: the dtypes it
    takes (of `dtypes`, default the device's), MoE ops, and attention where the backend has
    one. With none of `dtypes` taken, its first dtype."""
    taken = registry.backend(name).dtypes
    wanted = [d for d in (dtypes or default_dtypes(device.type))
              if DTYPES[d] in taken and not registry.interpreter_bf16(name, device.type, DTYPES[d])]
    if not wanted:
        wanted = [DTYPE_NAMES[d] for d in taken if d in DTYPE_NAMES][:1]
    ops = [op for op in OPS if op != "attention" or registry.has_attention(name)]
    return [(d, op) for d in wanted for op in ops]


def _child_command(name: str, device: torch.device, rows: list) -> tuple:
    spec = {"backend": name, "device": str(device), "plan": rows}
    if name not in registry.CONCRETE_BACKENDS:  # a registered backend: the child registers it
        backend = registry.backend(name)
        spec["register"] = {"module": backend.module,
                            "dtypes": [str(d).replace("torch.", "") for d in backend.dtypes]}
    # (the child tests the backend it is asked to, whatever the selection or exclusion here)
    env = {k: v for k, v in os.environ.items()
           if k not in ("M2DINO_KERNELS_BACKEND", registry.EXCLUDE_ENV)}
    env.update({"M2DINO_KERNELS_SELFTEST": "0", "PYTHONUNBUFFERED": "1",
                # the child imports what this process imports, from where it imports it
                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    # (faulthandler: a crash prints its Python stack to the child's stderr)
    command = [sys.executable, "-X", "faulthandler", "-m", "m2dino_kernels.selftest",
               "--child", json.dumps(spec)]
    return command, env


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        if line.startswith(CHILD_EVENT):
            lines.put(json.loads(line[len(CHILD_EVENT):]))
    lines.put(None)  # end of output


def _crash_detail(returncode: Optional[int], stderr_tail: str) -> str:
    if returncode is not None and returncode < 0:
        try:
            what = signal.Signals(-returncode).name
        except ValueError:
            what = f"signal {-returncode}"
    else:
        what = f"exit status {returncode}"
    errors = [line.strip() for line in stderr_tail.splitlines()
              if "error" in line.lower() or "what():" in line]
    return f"{what}: {errors[-1][:200]}" if errors else what


def _follow(child, rows: list, timeout: float, startup_timeout: float):
    """Read the child's events into `rows` until its output ends or a deadline passes (the
    start, then each op) -> (the row running at the end or None, whether the child started,
    whether a deadline passed)."""
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True)
    reader.start()
    running, ready, deadline = None, False, time.monotonic() + startup_timeout
    while True:
        try:
            event = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # the child and anything it started
            reader.join(timeout=10)  # (its output ends with it)
            return running, ready, True
        if event is None:
            return running, ready, False
        deadline = time.monotonic() + timeout
        if event["event"] == "ready":
            ready = True
        elif event["event"] == "start":
            running = next(r for r in rows if (r["dtype"], r["op"]) == (event["dtype"], event["op"]))
            running["started"] = time.monotonic()
        elif event["event"] == "done":
            running.update(status=event["status"], detail=event["detail"], seconds=event["seconds"])
            running = None


def _record_the_end(rows, running, ready, timed_out, returncode, stderr_tail, timeout,
                    startup_timeout) -> None:
    """The row the child was in when it was killed (timed out) or died (crashed); dying before
    the first op counts against the first row."""
    target = running if running is not None else (None if ready else (rows or [None])[0])
    if timed_out and target is not None:
        limit = timeout if ready else startup_timeout
        target.update(status="timed out", seconds=limit,
                      detail=f"over {limit:g} s" + ("" if ready else " (starting the child)"))
    elif target is not None:
        detail = _crash_detail(returncode, stderr_tail)
        target.update(status="crashed", detail=detail if ready else f"{detail} (starting the child)",
                      seconds=round(time.monotonic() - target["started"], 3)
                      if "started" in target else None)
    elif returncode and rows and all(r["status"] == "pass" for r in rows):
        rows[-1].update(status="crashed", detail=_crash_detail(returncode, stderr_tail))
    for row in rows:
        row.pop("started", None)


def run_backend(name: str, device, dtypes=None, timeout: Optional[float] = None,
                startup_timeout: float = STARTUP_TIMEOUT) -> dict:
    """The self-test of backend `name` on `device` in a child process -> its verdict:
    {"backend", "device", "status", "detail", "seconds", "when", "rows": [{"dtype", "op",
    "status", "detail", "seconds"}]}. status: the worst row's (crashed, timed out, wrong, not
    run, pass), detail: that row's. Never raises for what the backend does."""
    device = torch.device(device)
    timeout = default_timeout(device.type) if timeout is None else timeout
    rows = [{"dtype": d, "op": op, "status": "not run", "detail": "", "seconds": None}
            for d, op in plan(name, device, dtypes)]
    command, env = _child_command(name, device, [[r["dtype"], r["op"]] for r in rows])
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                 env=env, start_new_session=True)
        with child.stdout:
            running, ready, timed_out = _follow(child, rows, timeout, startup_timeout)
            returncode = child.wait()
        stderr.seek(0)
        stderr_tail = stderr.read()[-4000:]
    _record_the_end(rows, running, ready, timed_out, returncode, stderr_tail, timeout,
                    startup_timeout)
    status = min((r["status"] for r in rows), key=_SEVERITY.index, default="not run")
    worst = next((r for r in rows if r["status"] == status and status != "pass"), None)
    return {"backend": name, "device": device_label(device), "status": status,
            "detail": f"{worst['dtype']} {worst['op']}: {worst['detail']}" if worst else "",
            "seconds": round(time.perf_counter() - started, 3),
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": rows}
