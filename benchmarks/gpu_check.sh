#!/usr/bin/env bash
# The GPU check in one command, for a fresh GPU machine with torch and triton but no internet:
#   benchmarks/gpu_check.sh OUTDIR
# builds m2dino_kernels._C for this GPU's arch, runs the GPU subset of the tests (every op
# against its reference on CUDA in fp32, fp16 and bf16), then the GPU benchmarks, and writes
# logs and JSON under OUTDIR. Budget: under 8 minutes on an H100 (each step has a timeout).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
  "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null; } > "$out/env.txt" 2>&1
cat "$out/env.txt"

# 1. build: only this GPU's arch, to spend seconds rather than minutes
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "== build for sm_${arch/./}"
if ! TORCH_CUDA_ARCH_LIST="$arch" M2DINO_BUILD_CUDA=1 timeout 240 python3 setup.py build_ext --inplace \
    > "$out/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log); the GPU tests below run without the cuda backend"; status=1
  tail -20 "$out/build.log"
fi

# 2. the GPU tests: every kernel op against its reference on CUDA
echo "== GPU tests"
timeout 180 python3 -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$out/gpu_tests.xml" \
  2>&1 | tee "$out/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 3. the GPU benchmarks, side by side, ratios printed and saved as JSON
echo "== GPU benchmarks"
M2DINO_BENCH_JSON="$out/bench.json" timeout 240 python3 -m pytest benchmarks -q -p no:cacheprovider \
  --benchmark-json="$out/bench_raw.json" 2>&1 | tee "$out/bench.log" | grep -v "^test_" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done, status $status; results in $out"
exit $status
