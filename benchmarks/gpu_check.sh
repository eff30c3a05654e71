#!/usr/bin/env bash
# The GPU check in one command, for a fresh GPU machine with torch and triton but no internet:
#   benchmarks/gpu_check.sh OUTDIR
# Stages (each with its own time limit, all under one deadline of 8 min 50 s; a stage that
# fails or times out is recorded and the script goes on):
#   inspect      the Triton kernels compiled for this card's arch (python -m
#                m2dino_kernels.inspect): registers, spills, shared memory, mma per config,
#                into inspect.json, before anything runs on the card
#   build        m2dino_kernels._C for this GPU's arch only
#   selftest     the first code of ours to run on the card: each compiled backend (cuda,
#                triton) through the backend contract in a child process of its own with a
#                timeout (python -m m2dino_kernels.selftest), into selftest.json; a backend
#                that crashed, hung or disagreed (or never reported) is left out of every
#                stage after it (M2DINO_KERNELS_EXCLUDE): one broken kernel costs only its own
#   gpu_tests    every `gpu` test: each op and backend (cuda grouped + loop, grouped_mm,
#                triton, autotune) against its reference on CUDA in fp32, fp16 and bf16
#   bench_moe    matmul peak + MoE routing/MLP (every backend, grouped_mm, auto + its choice)
#   bench_attn   attention (triton, each SDPA backend, auto + its choice)
#   bench_model  the M2DINO-B training step (vs dense DINOv3-B) and its host syncs
#   train        50 bf16 steps of M2DINO-B at 224 px on the synthetic suite, batch 64
#   ddp          the same for 10 steps on 2 processes over NCCL (only with >= 2 GPUs)
# Everything lands in OUTDIR: <stage>.log, selftest.json, bench_*.json, gpu_tests.xml, train/,
# and summary.json (per stage: rc, seconds, timed_out; the self-test's verdicts and the
# backends left out; the autotuner's choices per benchmark case; the host syncs of one
# training step). Exit status 0 only when every stage passed.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export M2DINO_CACHE="$out/cache"   # synthetic suite, autotune decisions, self-test verdicts of this run
start=$(date +%s)
deadline=$((start + 530))
stages="$out/stages.tsv"
: > "$stages"

# stage NAME LIMIT_S CMD...: run CMD with output in NAME.log, limited to LIMIT_S seconds and
# to what is left before the deadline; record rc, seconds and whether it timed out.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - $(date +%s)))
  if (( left < 10 )); then
    echo "== $name: skipped (out of time)"; printf '%s\t%s\t%s\t%s\n' "$name" 125 0 skipped >> "$stages"
    return
  fi
  (( left < limit )) && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  local state=done; (( rc == 124 || rc == 137 )) && state=timed_out
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$state" >> "$stages"
  echo "   rc=$rc in ${took}s ($state)"; tail -15 "$out/$name.log" | sed 's/^/   | /'
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
  "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

sm=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
stage inspect 90 python3 -m m2dino_kernels.inspect --arch "$sm" --dtype bf16,fp16,fp32,tf32 \
  --json "$out/inspect.json"
stage build 120 env TORCH_CUDA_ARCH_LIST="$arch" M2DINO_BUILD_CUDA=1 MAX_JOBS=16 \
  python3 setup.py build_ext --inplace
stage selftest 150 python3 -m m2dino_kernels.selftest --device cuda:0 --timeout 45 \
  --json "$out/selftest.json"
failed=$(python3 - "$out/selftest.json" <<'EOF'
import json, sys
from m2dino_kernels import verdict
try:
    with open(sys.argv[1]) as f:
        verdicts = {v["backend"]: v["status"] for v in json.load(f)}
except (OSError, ValueError):
    verdicts = {}
print(",".join(n for n in verdict.offered_backends("cuda") if verdicts.get(n) not in ("pass", "not run")))
EOF
)
if [[ -n $failed ]]; then
  export M2DINO_KERNELS_EXCLUDE=$failed
  echo "== left out after the self-test: $failed"
fi
stage gpu_tests 110 python3 -m pytest tests -m gpu -q -p no:cacheprovider \
  --junitxml="$out/gpu_tests.xml"
bench() {  # bench NAME LIMIT FILES...
  local name=$1 limit=$2; shift 2
  stage "$name" "$limit" env M2DINO_BENCH_JSON="$out/$name.json" python3 -m pytest "$@" -q \
    -p no:cacheprovider --benchmark-json="$out/${name}_raw.json"
}
bench bench_moe 110 benchmarks/test_00_matmul_peak.py benchmarks/test_moe_bench.py
bench bench_attn 40 benchmarks/test_00_matmul_peak.py benchmarks/test_attention_bench.py
bench bench_model 50 benchmarks/test_model_bench.py
train=(python3 -m m2dino.train --model dinov3_vitb16 --img-size 224 --batch-size 64
       --paradigm au --amp bf16 --num-experts 8 --moe-layers 6 --no-progress)
stage train 45 "${train[@]}" --steps 50 --out "$out/train"
if (( gpus >= 2 )); then
  stage ddp 25 torchrun --standalone --nproc_per_node=2 "${train[@]:1}" --steps 10 --out "$out/ddp"
fi

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
summary = {"stages": {}, "selftest": {}, "excluded": os.environ.get("M2DINO_KERNELS_EXCLUDE", ""),
           "autotune_choices": {}, "host_syncs": {}}
try:
    with open(os.path.join(out, "selftest.json")) as f:
        summary["selftest"] = {v["backend"]: {"status": v["status"], "detail": v["detail"]}
                               for v in json.load(f)}
except (OSError, ValueError):
    pass
with open(os.path.join(out, "stages.tsv")) as f:
    for line in f:
        name, rc, seconds, state = line.rstrip("\n").split("\t")
        summary["stages"][name] = {"rc": int(rc), "seconds": int(seconds), "state": state}
for name in ("bench_moe", "bench_attn", "bench_model"):
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError):
        continue
    for r in rows:
        picked = {k[len("choice_"):]: v for k, v in r.items() if k.startswith("choice_")}
        if picked:
            summary["autotune_choices"][f"{r['case']} / {r['variant']}"] = picked
        if "host_syncs" in r:
            summary["host_syncs"][f"{r['case']} / {r['variant']}"] = {
                "host_syncs": r["host_syncs"], "tasks_present": r["tasks_present"]}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if all(s["rc"] == 0 for s in summary["stages"].values()) else 1)
EOF
status=$?
echo "== done in $(( $(date +%s) - start ))s, status $status; results in $out"
exit $status
