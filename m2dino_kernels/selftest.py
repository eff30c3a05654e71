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

Exits 1 when a backend failed. Verdicts of a full run (the default dtypes) are cached beside
the autotune decisions, where `auto`'s gate (m2dino_kernels.gate) reads them; --show prints
the cached verdicts and exits. Running a child and reading its verdict is
m2dino_kernels.verdict's; this module is the command and the child's side (`--child`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import torch

from m2dino_kernels import contract, gate, registry, verdict
from m2dino_kernels.autotune import first_line, synchronize
from m2dino_kernels.jsonfile import write_json
from m2dino_kernels.verdict import DTYPES


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
    sys.stdout.write(verdict.CHILD_EVENT + json.dumps(event) + "\n")
    sys.stdout.flush()


def _is_device_error(err: BaseException) -> bool:
    """An error after which the device (a CUDA context) is not to be used again."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return ((accelerator_error is not None and isinstance(err, accelerator_error))
            or "CUDA error" in str(err))


def _child(spec: dict) -> int:
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
# The command line
# ---------------------------------------------------------------------------------------
def table(verdicts: list) -> str:
    """One line per backend, dtype and op."""
    lines = [f"{'backend':12} {'dtype':6} {'op':16} {'verdict':10} {'seconds':>8}  detail"]
    for result in verdicts:
        for row in result["rows"]:
            seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
            lines.append(f"{result['backend']:12} {row['dtype']:6} {row['op']:16} "
                         f"{row['status']:10} {seconds:>8}  {row['detail']}")
    return "\n".join(lines)


def show(store) -> str:
    """The cached verdicts, one line each: backend, device, verdict, when, the key."""
    entries = store.entries()
    if not entries:
        return f"no self-test verdicts in {store.path}"
    lines = [f"self-test verdicts in {store.path}:"]
    for key, result in sorted(entries.items()):
        lines.append(f"  {result.get('backend', '?'):12} {result.get('device', '?'):28} "
                     f"{gate.describe(result)}  [{result.get('when', '?')}]  key {key}")
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
    offered = verdict.offered_backends(device.type)
    names = args.backend or offered
    for name in names:
        if name not in registry.concrete_backends():
            parser.error(f"--backend: unknown backend {name!r}; of {', '.join(registry.concrete_backends())}")
        with verdict.child_environment(device.type):
            if not registry.backend(name).runs_on(device.type):
                parser.error(f"--backend {name}: cannot run on {device.type}; there: "
                             f"{', '.join(offered) or 'no compiled backend'}")
    if args.json and os.path.exists(args.json):
        parser.error(f"--json: {args.json} exists; not overwriting it")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout: must be positive, got {args.timeout}")
    full = set(args.dtype or verdict.default_dtypes(device.type)) >= set(verdict.default_dtypes(device.type))
    verdicts = []
    for name in names:
        print(f"== {name} on {verdict.device_label(device)}", file=sys.stderr, flush=True)
        result = verdict.run_backend(name, device, args.dtype, args.timeout)
        verdicts.append(result)
        if full and registry.is_compiled(name):  # what the gate would have run: cache it for `auto`
            gate.STORE.save(gate.verdict_key(name, device), result)
    print(table(verdicts))
    failed = [v["backend"] for v in verdicts if v["status"] not in ("pass", "not run")]
    print(f"\n{len(verdicts)} backends on {verdict.device_label(device)}: "
          + (f"failed: {', '.join(failed)}" if failed else "all passed"))
    if args.json:
        write_json(args.json, verdicts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
