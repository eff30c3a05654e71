"""The CUDA C++ kernels (csrc/kernels.cu) compiled for sm_80 and sm_90 with nvcc's
--resource-usage: no kernel of the bf16 path may spill registers.

Compiles the source itself with the flags setup.py uses (one process per arch, in parallel);
skipped where nvcc or a CUDA build of torch is missing. Nothing is launched.
"""
import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "kernels.cu")
ARCHS = (80, 90)

# ptxas prints, per kernel: "Compiling entry function '_Z...' for 'sm_90'", then
# "Function properties for ...", "N bytes stack frame, N bytes spill stores, N bytes spill loads"
# and "Used N registers, ... N bytes smem".
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_resource_usage(log: str):
    """{(mangled kernel, arch): {"regs", "spill_stores", "spill_loads", "smem"}} from the log."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), int(m.group(2)))
            out[current] = {"regs": None, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            out[current]["spill_stores"], out[current]["spill_loads"] = int(m.group(2)), int(m.group(3))
        m = _USED.search(line)
        if m:
            out[current]["regs"] = int(m.group(1))
            out[current]["smem"] = int(m.group(2) or 0)
    return out


def compile_resource_usage(arch: int) -> str:
    from torch.utils import cpp_extension
    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["nvcc", "-c", SOURCE, "-o", os.path.join(tmp, "k.o"), "-O3", "-std=c++20",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "--resource-usage",
               "-DM2DINO_WITH_CUDA=1", f"-I{os.path.join(ROOT, 'csrc')}", *includes,
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
               "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def is_bf16_path(mangled: str) -> bool:
    # c10::BFloat16 mangles as N3c108BFloat16E; __nv_bfloat16 as 13__nv_bfloat16.
    return "BFloat16" in mangled or "nv_bfloat16" in mangled


@pytest.fixture(scope="module")
def usage():
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        logs = list(pool.map(compile_resource_usage, ARCHS))
    usage = {}
    for log in logs:
        usage.update(parse_resource_usage(log))
    return usage


def test_every_arch_has_kernels(usage):
    assert {arch for _, arch in usage} == set(ARCHS)


def test_bf16_kernels_do_not_spill(usage):
    bf16 = {k: v for k, v in usage.items() if is_bf16_path(k[0])}
    assert bf16, "no bf16 kernel instantiation found in the build log"
    spills = [f"{name} sm_{arch}: {v['spill_stores']} B stores" for (name, arch), v in bf16.items()
              if v["spill_stores"] or v["spill_loads"]]
    assert not spills, "\n".join(spills)


def test_parse_resource_usage_reads_ptxas_lines():
    log = ("ptxas info    : Compiling entry function '_Z3fooIN3c108BFloat16EEvv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooIN3c108BFloat16EEvv\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]\n")
    got = parse_resource_usage(log)
    assert got == {("_Z3fooIN3c108BFloat16EEvv", 90): {"regs": 40, "spill_stores": 4,
                                                       "spill_loads": 4, "smem": 2048}}


def short_name(demangled: str) -> str:
    """`void m2dino::(anonymous namespace)::combine_kernel<c10::BFloat16, float>(...)` ->
    `combine_kernel<BFloat16, float>`: the kernel and its template arguments."""
    name = demangled.removeprefix("void ").replace("c10::", "")
    name = name.split("(anonymous namespace)::")[-1]
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first "(" outside <...>
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def test_short_name_keeps_kernel_and_template_arguments():
    assert short_name("void m2dino::(anonymous namespace)::combine_kernel<c10::BFloat16, float>"
                      "(c10::BFloat16*, long const*)") == "combine_kernel<BFloat16, float>"
    assert short_name("m2dino::(anonymous namespace)::offsets_kernel(long const*, long, long*)") == "offsets_kernel"


def markdown_table(usage) -> str:
    """One row per kernel instantiation (demangled): registers / spill stores (B) / smem (B)
    per arch, as benchmarks/RESULTS.md shows them."""
    names = sorted({name for name, _ in usage})
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                               text=True).stdout.splitlines() if shutil.which("c++filt") else names
    header = " | ".join(f"sm_{arch} regs / spill / smem" for arch in ARCHS)
    lines = [f"| kernel | {header} |", "| --- |" + " --- |" * len(ARCHS)]
    for name, pretty in sorted(zip(names, demangled), key=lambda p: p[1]):
        cells = []
        for arch in ARCHS:
            v = usage.get((name, arch))
            cells.append(f"{v['regs']} / {v['spill_stores']} / {v['smem']}" if v else "-")
        lines.append(f"| `{short_name(pretty)}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/kernels/test_cuda_resource_usage.py: the RESULTS.md table
    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        found = {}
        for log in pool.map(compile_resource_usage, ARCHS):
            found.update(parse_resource_usage(log))
    print(markdown_table(found))
