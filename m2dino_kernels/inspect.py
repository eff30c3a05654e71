"""Compile every Triton kernel variant for a GPU target, without a GPU, and report its resources.

    python -m m2dino_kernels.inspect [--arch 80,90] [--dtype bf16,fp32] [--json FILE]
        [--kernel NAME,...] [--workers N] [--summary] [--all-configs]

The kernels' launch sites are run for real (the host code of m2dino_kernels.triton.moe and
.attention) on "meta" tensors of every preset's shapes, with the launches recorded instead of
run: each recorded launch gives the kernel, its arguments and constexprs exactly as the host
code passed them, and the autotune configs the kernel can choose. Each (launch, config, arch)
is then compiled with triton.compile for that target; Triton's own ptxas (in its wheel) gives
registers and spills, the compiled metadata the shared memory, and the PTX whether the dots
became tensor-core instructions (mma / wgmma). Works on a CPU-only machine and on a GPU one.

A launch on meta tensors behaves like one on CUDA: fp32 dots follow torch's fp32 matmul
precision, exact ("ieee", FMA code) for --dtype fp32 and TF32 for --dtype tf32; bf16 and fp16
dots run on tensor cores. Only the configs autotune may offer on the arch are compiled unless
--all-configs. Exits 1 when a compiled variant breaks the rule `problems` states.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import inspect as _pyinspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

from m2dino_kernels.jsonfile import write_json
from m2dino_kernels.shapes import PRESET_SHAPES, TRITON_HEAD_DIMS
from m2dino_kernels.triton.target import SHARED_MEMORY_BY_ARCH as MAX_SHARED

# --dtype names: the tensors' dtype; "tf32" is fp32 tensors with TF32 matmuls allowed
# (torch.set_float32_matmul_precision("high")), which the kernels' fp32 dots then follow.
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "tf32": "float32"}


@dataclass
class Launch:
    kernel: str            # kernel name, with the host function that launched it
    module: str            # module of the kernel (to find it again in a worker process)
    attr: str              # attribute name of the kernel object in that module
    shape: str             # shape class (preset, top-k, ...)
    signature: dict        # name -> triton type or "constexpr"
    constexprs: dict       # name -> value, without the config's
    divisible: list        # names of the arguments the JIT marks 16-divisible
    configs: list          # [(kwargs, num_warps, num_stages)]; one default entry when untuned
    pruned: list           # per config: whether autotune's early prune drops it for the arch
    has_dot: bool          # whether the kernel's source has tl.dot
    arch: int = 90


@dataclass
class Result:
    kernel: str
    shape: str
    config: str
    dtype: str
    arch: int
    compiled: bool
    error: str = ""
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared: Optional[int] = None
    fits_shared: Optional[bool] = None
    mma: str = ""          # "wgmma", "mma" or "" (FMA code)
    has_dot: bool = False
    prec: str = ""         # the dots' input precision ("ieee" fp32 has no tensor-core form)
    pruned: bool = False   # autotune never offers this config on the arch
    extra: dict = field(default_factory=dict)


def cuda_target_available() -> bool:
    """Whether this Triton can compile for a CUDA target (its NVIDIA backend is installed)."""
    try:
        from triton.backends import backends  # noqa: PLC0415
    except ImportError:
        return False
    return "nvidia" in backends


# ---------------------------------------------------------------------------------------
# Recording the launches
# ---------------------------------------------------------------------------------------
def _triton_type(value) -> str:
    import torch  # noqa: PLC0415
    if isinstance(value, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.int8: "i8"}
        return "*" + names[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


class _Recorder:
    """Replaces Autotuner.run and JITFunction.run while active: records, launches nothing."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.shape = ""
        self.arch = 90

    def _host_caller(self) -> str:
        names = []
        for frame in _pyinspect.stack()[2:]:
            if os.sep + "triton" + os.sep in frame.filename and "m2dino_kernels" in frame.filename:
                if frame.function not in ("run", "__call__", "<lambda>"):
                    names.append(f"{frame.function}:{frame.lineno}" if names else frame.function)
        # outer host function (with its line: one function may launch a kernel twice) > launcher
        return ">".join(reversed(names[:2])) or "?"

    def record(self, jit_fn, args, kwargs, configs, kept=None):
        import triton  # noqa: PLC0415
        params = jit_fn.params
        bound = dict(zip(jit_fn.arg_names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in jit_fn.arg_names})
        signature, constexprs, divisible = {}, {}, []
        config_keys = set()
        for cfg in configs or []:
            config_keys |= set(cfg.kwargs)
        for p in params:
            name = p.name
            if name in config_keys:
                signature[name] = "constexpr"
                continue
            if name not in bound:
                if p.default is not _pyinspect.Parameter.empty:
                    bound[name] = p.default
                else:
                    raise TypeError(f"{jit_fn.__name__}: argument {name} not passed")
            value = bound[name]
            if p.is_constexpr or value is None:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, int) and not isinstance(value, bool) and value == 1 \
                    and not getattr(p, "do_not_specialize", False):
                # The launcher specialises integer 1 to a constant, as Triton does.
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = _triton_type(value)
                # As the JIT specialises: tensors (torch allocates 16-byte aligned; meta tensors
                # stand for those) and integers that are multiples of 16.
                if not getattr(p, "do_not_specialize", False) and (
                        signature[name].startswith("*")
                        or (signature[name] in ("i32", "i64") and value % 16 == 0)):
                    divisible.append(name)
        if configs:
            cfgs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
        else:
            cfgs = [({}, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))]
        kept_ids = {id(c) for c in kept} if kept is not None else None
        pruned = [kept_ids is not None and id(c) not in kept_ids for c in (configs or [None])]
        src = jit_fn.src if hasattr(jit_fn, "src") else ""
        module = jit_fn.fn.__module__
        attr = jit_fn.__name__
        caller = self._host_caller()
        self.launches.append(Launch(
            kernel=f"{attr}[{caller}]", module=module, attr=attr, shape=self.shape,
            signature=signature, constexprs=constexprs, divisible=divisible, configs=cfgs,
            pruned=pruned,
            arch=self.arch,
            has_dot="tl.dot" in src or "_dot(" in src))
        del triton

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.autotuner import Autotuner  # noqa: PLC0415
        from triton.runtime.jit import JITFunction  # noqa: PLC0415
        recorder = self
        saved = Autotuner.run, JITFunction.run

        def autotuner_run(self, *args, **kwargs):
            fn = self.fn
            while not isinstance(fn, JITFunction):  # through heuristics wrappers
                fn = fn.fn
            kept = self.configs
            prune = getattr(self, "early_config_prune", None)
            if prune:
                kept = prune(self.configs, dict(zip(fn.arg_names, args, strict=False)), **kwargs)
            recorder.record(fn, args, kwargs, self.configs, kept)

        def jit_run(self, *args, grid=None, warmup=False, **kwargs):
            recorder.record(self, args, kwargs, None)

        Autotuner.run, JITFunction.run = autotuner_run, jit_run
        try:
            yield self
        finally:
            Autotuner.run, JITFunction.run = saved


@contextlib.contextmanager
def _fp32_matmul_precision(precision):
    """torch's fp32 matmul precision while recording ("highest": exact fp32 dots; "high":
    TF32), which the kernels' fp32 dots follow."""
    import torch  # noqa: PLC0415
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _record_dtype(rec, dname, tokens, num_tasks, batch, seq):
    """The launches of one --dtype: the MoE of every preset (m2dino_kernels.shapes) at top-k 1
    and 2, attention at every head dim the kernels take, with and without RoPE."""
    import torch  # noqa: PLC0415

    from m2dino_kernels.backends import ExpertWeights  # noqa: PLC0415
    from m2dino_kernels.triton import attention, moe  # noqa: PLC0415
    dt = getattr(torch, DTYPES[dname])
    meta = torch.device("meta")
    E = 8
    for preset, D, H, act, _head_dim in PRESET_SHAPES:
        H1 = 2 * H if act == "swiglu" else H
        for top_k in (1, 2):
            rec.shape = f"{preset} D={D} H={H} {act} k={top_k} {dname}"
            T = tokens
            x = torch.empty(T, D, dtype=dt, device=meta)
            task_ids = torch.empty(T, dtype=torch.int64, device=meta)
            gate_w = torch.empty(num_tasks, E, D, dtype=dt, device=meta)
            gate_b = torch.empty(num_tasks, E, dtype=dt, device=meta)
            routed = moe.route_forward(x, task_ids, gate_w, gate_b, top_k)
            params = ExpertWeights(torch.empty(E, H1, D, dtype=dt, device=meta),
                                   torch.empty(E, H1, dtype=dt, device=meta),
                                   torch.empty(E, D, H, dtype=dt, device=meta),
                                   torch.empty(E, D, dtype=dt, device=meta))
            y, h_pre, expert_out = moe.experts_forward(x, routed, params, act)
            moe.experts_backward(torch.empty_like(y), x, routed, params, act, h_pre,
                                 expert_out)
            gl = torch.empty(T, E, dtype=torch.float32, device=meta)
            gw = torch.empty(T, top_k, dtype=torch.float32, device=meta)
            moe.route_backward(gl, gl, gw, x, task_ids, gate_w, True, routed)
    for hd in TRITON_HEAD_DIMS:
        heads = 6
        for rope in (False, True):
            rec.shape = f"attention d={hd} rope={rope} {dname}"
            q = torch.empty(batch, heads, seq, hd, dtype=dt, device=meta)
            sin = cos = None
            prefix = 1
            if rope:
                sin = torch.empty(1, seq - prefix, hd, dtype=torch.float32, device=meta)
                cos = torch.empty_like(sin)
            out, lse = attention.attention_forward(q, q, q, sin, cos, prefix)
            attention.attention_backward(q, q, q, q, sin, cos, out, lse, prefix)


def record_launches(dtypes, arch=90, tokens=256, num_tasks=2, batch=2, seq=197):
    """Run the host code of every Triton kernel on meta tensors, for every preset shape class,
    dtype, top-k 1-2, and attention head dim, choosing configs for `arch`; return the
    distinct launches."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("m2dino_kernels.inspect compiles the GPU configs: unset TRITON_INTERPRET")
    from m2dino_kernels.triton import target  # noqa: PLC0415

    rec = _Recorder()
    rec.arch = arch
    with rec.active(), target.compile_target(arch):
        for dname in dtypes:
            with _fp32_matmul_precision("high" if dname == "tf32" else "highest"):
                _record_dtype(rec, dname, tokens, num_tasks, batch, seq)
    # Distinct variants only: the same kernel, signature, constexprs and offered configs compile
    # the same, whichever host line launched it (the name keeps the first).
    seen, distinct = set(), []
    for launch in rec.launches:
        key = (launch.module, launch.attr, json.dumps(launch.signature, sort_keys=True),
               json.dumps(launch.constexprs, sort_keys=True, default=str),
               json.dumps([c for c, p in zip(launch.configs, launch.pruned) if not p], default=str))
        if key not in seen:
            seen.add(key)
            distinct.append(launch)
    return distinct


# ---------------------------------------------------------------------------------------
# Compiling one variant
# ---------------------------------------------------------------------------------------
def _ptxas() -> str:
    import triton  # noqa: PLC0415
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: int):
    """(registers, spill stores, spill loads) from ptxas -v on the kernel's PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-400:]}")
    regs = _PTXAS_RE.search(log)
    spill = _SPILL_RE.search(log)
    return (int(regs.group(1)) if regs else None,
            int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0)


def _metadata(compiled, name, default=None):
    md = compiled.metadata
    if isinstance(md, dict):
        return md.get(name, default)
    return getattr(md, name, default)


def compile_variant(job) -> dict:
    """Compile one (launch, config, arch); never raises: errors go into the result."""
    launch, cfg_index, dtype = job
    arch = launch["arch"]
    import importlib  # noqa: PLC0415

    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    kwargs, num_warps, num_stages = launch["configs"][cfg_index]
    cfg_name = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    cfg_name = f"{cfg_name}{', ' if cfg_name else ''}w{num_warps} s{num_stages}"
    res = Result(kernel=launch["kernel"], shape=launch["shape"], config=cfg_name, dtype=dtype,
                 arch=arch, compiled=False, has_dot=launch["has_dot"],
                 prec=str(launch["constexprs"].get("PREC", "")), pruned=launch["pruned"][cfg_index])
    try:
        obj = getattr(importlib.import_module(launch["module"]), launch["attr"])
        from triton.runtime.jit import JITFunction  # noqa: PLC0415
        while not isinstance(obj, JITFunction):
            obj = obj.fn
        constexprs = dict(launch["constexprs"])
        constexprs.update(kwargs)
        attrs = {(obj.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch["divisible"]}
        src = triton.compiler.ASTSource(fn=obj, signature=dict(launch["signature"]),
                                        constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = compiled.asm["ptx"]
        res.regs, res.spill_stores, res.spill_loads = _ptxas_usage(ptx, arch)
        res.shared = int(_metadata(compiled, "shared", 0))
        res.fits_shared = res.shared <= MAX_SHARED.get(arch, MAX_SHARED[80])
        res.mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
        res.compiled = True
    except Exception as exc:  # the compiler's error is the result
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
    return asdict(res)


def inspect_all(archs=(90, 80), dtypes=("bf16", "fp32"), workers=None, kernels=None, all_configs=False):
    """Record launches, compile every variant in a process pool; return the result dicts.
    Configs autotune never offers on the arch are compiled only with `all_configs`."""
    jobs = []
    for arch in archs:
        for launch in record_launches(dtypes, arch):
            if kernels and not any(k in launch.kernel for k in kernels):
                continue
            dtype = launch.shape.rsplit(" ", 1)[-1]
            for i, pruned in enumerate(launch.pruned):
                if all_configs or not pruned:
                    jobs.append((asdict(launch), i, dtype))
    from tqdm import tqdm  # noqa: PLC0415

    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        # progress on stderr: a full run is hundreds of compiles
        return list(tqdm(pool.map(compile_variant, jobs, chunksize=1), total=len(jobs), desc="compiling",
                         unit="variant", file=sys.stderr, mininterval=5, disable=None))


def problems(results) -> list[str]:
    """What fails the acceptance rule: a compile error, a spill, a config over the target's
    shared memory, or a kernel with a dot that has no tensor-core instruction."""
    out = []
    for r in results:
        if r["pruned"]:
            continue
        where = f"{r['kernel']} {r['config']} sm_{r['arch']} ({r['shape']})"
        if not r["compiled"]:
            out.append(f"{where}: {r['error']}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if not r["fits_shared"]:
            out.append(f"{where}: {r['shared']} B shared > {MAX_SHARED[r['arch']]}")
        if r["has_dot"] and not r["mma"] and r["prec"] != "ieee":
            out.append(f"{where}: dot compiled to FMA code (no mma/wgmma)")
    return out


def _table(results) -> str:
    lines = [f"{'kernel':52} {'arch':>4} {'dtype':5} {'config':38} {'regs':>4} {'spill':>6} "
             f"{'smem':>7} mma"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["config"])):
        if r["compiled"]:
            lines.append(f"{r['kernel'][:52]:52} {r['arch']:>4} {r['dtype']:5} {r['config'][:38]:38} "
                         f"{r['regs']:>4} {r['spill_stores']:>6} {r['shared']:>7} {r['mma'] or '-'}"
                         f"{'' if r['fits_shared'] else '  OVER SMEM'}{'  (pruned)' if r['pruned'] else ''}")
        else:
            lines.append(f"{r['kernel'][:52]:52} {r['arch']:>4} {r['dtype']:5} {r['config'][:38]:38} "
                         f"ERROR {r['error'][:120]}")
    return "\n".join(lines)


def summary(results) -> str:
    """A markdown table, one row per kernel (launch site), arch and dtype: how many variants
    (a config autotune may offer, at one shape class) compiled, and over those the register
    range, the largest spill and shared memory, and the tensor-core instruction."""
    groups = {}
    for r in results:
        if r["pruned"]:
            continue
        groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    lines = ["| kernel | arch | dtype | variants | regs | spill (B) | smem (B) | MMA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, arch, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if r["compiled"]]
        if len(ok) < len(rs):
            lines.append(f"| `{kernel}` | sm_{arch} | {dtype} | {len(rs)} | {len(rs) - len(ok)} failed | | | |")
            continue
        regs = sorted({r["regs"] for r in ok})
        spill = max(max(r["spill_stores"], r["spill_loads"]) for r in ok)
        mma = "/".join(sorted({r["mma"] or ("FMA (exact fp32)" if r["has_dot"] else "-") for r in ok}))
        lines.append(f"| `{kernel}` | sm_{arch} | {dtype} | {len(rs)} | "
                     f"{regs[0] if len(regs) == 1 else f'{regs[0]}-{regs[-1]}'} | {spill} | "
                     f"{max(r['shared'] for r in ok)} | {mma} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino_kernels.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90",
                        help=f"comma-separated compute capabilities, of {sorted(MAX_SHARED)} (default 80,90)")
    parser.add_argument("--dtype", default="bf16,fp32", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--json", default=None, help="write every result to this JSON file (a new file)")
    parser.add_argument("--kernel", default=None,
                        help="only kernels whose name contains one of these, comma-separated")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--summary", action="store_true",
                        help="print one markdown row per kernel, arch and dtype instead of one per config")
    parser.add_argument("--all-configs", action="store_true",
                        help="also compile the configs autotune never offers on the arch (marked pruned)")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        parser.error(f"--arch: expected comma-separated integers like 80,90, got {args.arch!r}")
    for a in archs:
        if a not in MAX_SHARED:
            parser.error(f"--arch: {a} not one of {sorted(MAX_SHARED)}")
    dtypes = tuple(args.dtype.split(","))
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtype: {d!r} not one of {sorted(DTYPES)}")
    if args.json and os.path.exists(args.json):
        parser.error(f"--json: {args.json} exists; not overwriting it")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers: must be at least 1, got {args.workers}")
    if not cuda_target_available():
        parser.error("this Triton cannot compile for CUDA (no triton package, or its NVIDIA "
                     "backend is missing)")
    kernels = args.kernel.split(",") if args.kernel else None
    results = inspect_all(archs, dtypes, args.workers, kernels, args.all_configs)
    if not results:
        parser.error(f"--kernel: no launch of a kernel named like {args.kernel!r}")
    print(summary(results) if args.summary else _table(results))
    bad = problems(results)
    print(f"\n{len(results)} variants, {sum(r['compiled'] for r in results)} compiled, {len(bad)} problems")
    for p in bad:
        print("  " + p)
    if args.json:
        write_json(args.json, results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
