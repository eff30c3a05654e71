"""The self-test: the backend contract for each compiled backend on a device, each backend in
its own child process with a timeout, so that a kernel that crashes the process, poisons the
CUDA context or hangs costs a verdict, not the caller.

    python -m m2dino_kernels.selftest [--device cuda:0] [--backend NAME ...] [--dtype fp32 ...]
        [--timeout SECONDS] [--json FILE] [--show]

For each backend (default: every compiled backend that runs on the device: cpp, cuda, triton
and registered ones; on CPU Triton runs under its interpreter), dtype (default: fp32, bf16 and
fp16 on CUDA, fp32 on CPU; those the backend takes) and op (task_topk_route, expert_mlp, and
attention for the backends that have one) it runs the checks of m2dino_kernels.contract --
the ones tests/kernels/test_conformance.py runs: routing and expert MLP forward and gradients
against the reference at odd shapes, idle experts, tasks without tokens, ties, NaN, the empty
batch, half precision; attention with and without RoPE -- and prints a table:

    backend x dtype x op -> pass / wrong (worst error) / crashed (signal, or the error's first
    line, e.g. a CUDA error) / timed out, with seconds

A child that dies takes the op it was running with it; the ops after it are "not run". Exits 1
when a backend failed. Verdicts of a full run (the default dtypes) are cached beside the
autotune decisions, where `auto`'s gate (m2dino_kernels.gate) reads them; --show prints the
cached verdicts and exits. The timeout is per op (default 600 s on CUDA: the first run
compiles the Triton kernels; 300 s on CPU), after the child's start (at most 300 s);
M2DINO_KERNELS_SELFTEST_TIMEOUT sets it for the gate.
"""
from __future__ import annotations

import argparse
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
from functools import partial
from typing import Optional

import torch

from m2dino_kernels import contract, gate, registry
from m2dino_kernels.jsonfile import write_json

OPS = ("task_topk_route", "expert_mlp", "attention")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
TIMEOUT_ENV = "M2DINO_KERNELS_SELFTEST_TIMEOUT"
STARTUP_TIMEOUT = 300.0
_MARK = "@m2dino-selftest "
# what ends a backend's verdict, worst first
_SEVERITY = ("crashed", "timed out", "wrong", "not run", "pass")


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
def _child_environment(device_type: str):
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
    with _child_environment(device_type):
        return [name for name in registry.compiled_backends()
                if registry.backend(name).runs_on(device_type)]


def plan(name: str, device: torch.device, dtypes=None) -> list:
    """[(dtype name, op)] the self-test runs for backend `name` on `device`: the dtypes it
    takes (of `dtypes`, default the device's), MoE ops, and attention where the backend has
    one. With none of `dtypes` taken, its first dtype."""
    taken = registry.backend(name).dtypes
    wanted = [d for d in (dtypes or default_dtypes(device.type))
              if DTYPES[d] in taken and not contract.interpreter_bf16(name, device.type, DTYPES[d])]
    if not wanted:
        wanted = [DTYPE_NAMES[d] for d in taken if d in DTYPE_NAMES][:1]
    ops = [op for op in OPS if op != "attention" or contract.has_attention(name)]
    return [(d, op) for d in wanted for op in ops]


def checks(op: str, name: str, device: torch.device, dtype: torch.dtype) -> list:
    """The contract's checks of one (op, dtype) row, as calls without arguments. A row calls
    only its own op, except the expert MLP's checks of the whole chain (routing first)."""
    dev = str(device)
    if op == "attention":
        return [partial(contract.check_attention, name, dtype, dev)]
    fp32 = dtype == torch.float32
    if op == "task_topk_route":
        cases = contract.CASES if fp32 else contract.PROTOCOL_CASES
        out = [partial(contract.check_routing, name, case, device=dev, dtype=dtype)
               for case in cases]
        if fp32:
            out.append(partial(contract.check_ties, name, dev))
        return out
    out = [partial(contract.check_experts, name, case, act, dev, dtype)
           for case in contract.PROTOCOL_CASES for act in contract.ACTIVATIONS]
    if fp32:
        out += [partial(contract.check_public_ops, name, case, act, dev)
                for case in contract.PUBLIC_OPS_CASES for act in contract.ACTIVATIONS]
        out += [partial(check, name, dev) for check in (
            contract.check_missing_upstream_gradients, contract.check_nan_policy,
            contract.check_empty_batch, contract.check_non_contiguous)]
    else:
        out.append(partial(contract.check_half_precision, name, dtype, dev))
        if dtype == torch.bfloat16:
            out.append(partial(contract.check_autocast, name, dev))
    return out


# ---------------------------------------------------------------------------------------
# The child: runs the rows, one JSON line per event on stdout
# ---------------------------------------------------------------------------------------
def _emit(**event) -> None:
    sys.stdout.write(_MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


def _is_device_error(err: BaseException) -> bool:
    """An error after which the device (a CUDA context) is not to be used again."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return ((accelerator_error is not None and isinstance(err, accelerator_error))
            or "CUDA error" in str(err))


def _child(spec: dict) -> int:
    from m2dino_kernels.autotune import first_line, synchronize  # noqa: PLC0415

    name, device = spec["backend"], torch.device(spec["device"])
    if spec.get("register"):
        extra = spec["register"]
        registry.register_backend(name, extra["module"], [getattr(torch, d) for d in extra["dtypes"]],
                                  (device.type,))
    _emit(event="ready")
    for dtype_name, op in spec["plan"]:
        _emit(event="start", dtype=dtype_name, op=op)
        start = time.perf_counter()
        status, detail = "pass", ""
        try:
            for check in checks(op, name, device, DTYPES[dtype_name]):
                check()
            synchronize(device)
        except contract.ContractViolation as err:
            status, detail = "wrong", str(err).strip().splitlines()[0][:300]
        except Exception as err:  # noqa: BLE001 (any error is the verdict)
            status, detail = "crashed", first_line(err)
            if _is_device_error(err):
                _emit(event="done", dtype=dtype_name, op=op, status=status, detail=detail,
                      seconds=round(time.perf_counter() - start, 3))
                return 3  # the context is gone: the ops after it are not run
        _emit(event="done", dtype=dtype_name, op=op, status=status, detail=detail,
              seconds=round(time.perf_counter() - start, 3))
    return 0


# ---------------------------------------------------------------------------------------
# The parent: one child per backend, deadlines, the verdict
# ---------------------------------------------------------------------------------------
def _child_command(name: str, device: torch.device, rows: list) -> tuple:
    spec = {"backend": name, "device": str(device), "plan": rows}
    if name not in registry.CONCRETE_BACKENDS:  # a registered backend: the child registers it
        backend = registry.backend(name)
        spec["register"] = {"module": backend.module,
                            "dtypes": [str(d).replace("torch.", "") for d in backend.dtypes]}
    env = {k: v for k, v in os.environ.items() if k != "M2DINO_KERNELS_BACKEND"}
    env.update({gate.ENV_VAR: "0", "PYTHONUNBUFFERED": "1",
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
        if line.startswith(_MARK):
            lines.put(json.loads(line[len(_MARK):]))
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
    return {"backend": name, "device": gate.device_label(device), "status": status,
            "detail": f"{worst['dtype']} {worst['op']}: {worst['detail']}" if worst else "",
            "seconds": round(time.perf_counter() - started, 3),
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": rows}


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
def table(verdicts: list) -> str:
    """One line per backend, dtype and op."""
    lines = [f"{'backend':12} {'dtype':6} {'op':16} {'verdict':10} {'seconds':>8}  detail"]
    for verdict in verdicts:
        for row in verdict["rows"]:
            seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
            lines.append(f"{verdict['backend']:12} {row['dtype']:6} {row['op']:16} "
                         f"{row['status']:10} {seconds:>8}  {row['detail']}")
    return "\n".join(lines)


def show(store: gate.VerdictStore) -> str:
    """The cached verdicts, one line each: backend, device, verdict, when, the key."""
    entries = store.entries()
    if not entries:
        return f"no self-test verdicts in {store.path}"
    lines = [f"self-test verdicts in {store.path}:"]
    for key, verdict in sorted(entries.items()):
        lines.append(f"  {verdict.get('backend', '?'):12} {verdict.get('device', '?'):28} "
                     f"{gate.describe(verdict)}  [{verdict.get('when', '?')}]  key {key}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m2dino_kernels.selftest",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None,
                        help="the device to test on (default cuda:0 when there is one, else cpu)")
    parser.add_argument("--backend", nargs="+", default=None, metavar="NAME",
                        help="backends to test (default: the compiled ones that run there)")
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                        help="dtypes (default fp32 bf16 fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one op may take (default 600 on CUDA, 300 on CPU)")
    parser.add_argument("--json", default=None, help="also write the verdicts to this new file")
    parser.add_argument("--show", action="store_true",
                        help="print the cached verdicts (what `auto`'s gate uses) and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child(json.loads(args.child))
    if args.show:
        print(show(gate.STORE))
        return 0
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device here")
    offered = offered_backends(device.type)
    names = args.backend or offered
    for name in names:
        if name not in registry.concrete_backends():
            parser.error(f"--backend: unknown backend {name!r}; of {', '.join(registry.concrete_backends())}")
        with _child_environment(device.type):
            if not registry.backend(name).runs_on(device.type):
                parser.error(f"--backend {name}: cannot run on {device.type}; there: "
                             f"{', '.join(offered) or 'no compiled backend'}")
    if args.json and os.path.exists(args.json):
        parser.error(f"--json: {args.json} exists; not overwriting it")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout: must be positive, got {args.timeout}")
    full = set(args.dtype or default_dtypes(device.type)) >= set(default_dtypes(device.type))
    verdicts = []
    for name in names:
        print(f"== {name} on {gate.device_label(device)}", file=sys.stderr, flush=True)
        verdict = run_backend(name, device, args.dtype, args.timeout)
        verdicts.append(verdict)
        if full and gate.gated(name):  # what the gate would have run: cache it for `auto`
            gate.STORE.save(gate.verdict_key(name, device), verdict)
    print(table(verdicts))
    failed = [v["backend"] for v in verdicts if v["status"] not in ("pass", "not run")]
    print(f"\n{len(verdicts)} backends on {gate.device_label(device)}: "
          + (f"failed: {', '.join(failed)}" if failed else "all passed"))
    if args.json:
        write_json(args.json, verdicts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
