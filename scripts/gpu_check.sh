#!/usr/bin/env bash
# GPU check of the embedded default, run from the repository root on a CUDA machine.
#
# 1. memory: stage 2 alone, DeepSpeed ZeRO-2 fp16 on one GPU to its final save, the checkpoint served on an hf
#    engine in fp16 and asked one question, and mmdc.sizing's estimate for that worker printed next to its
#    torch.cuda.max_memory_allocated (scripts/gpu_memory_check.py; memory_check.json).
# 2. gpu: one whole iteration of the tiny-world job on the GPU: hf engines in fp16, stage 1 DDP with fp16
#    autocast and GradScaler, stage 2 DeepSpeed ZeRO-2 fp16 with dynamic loss scaling, one Ray Train worker on
#    the GPU; the plan of that job (plan_gpu.txt) and each trainer's measured peak (its metrics.jsonl) after it.
# 3. cpu: the same job CPU only on the same machine, as the baseline that GPU figures are read against.
# The logs and run folders (checkpoints left out) go to $OUT (default ./gpu_check_out). Results and the recipe
# for a machine without a package index: benchmarks/results/gpu_check.md.
#
#   MEMORY_BUDGET_S / GPU_BUDGET_S / CPU_BUDGET_S  seconds each step may take (0 skips that step)
#   CPU_ONLY=1                   step 1 on the CPU (fp32, gloo): tries the script on a machine without a GPU
#   PYTHON                       the interpreter with mmdc's dependencies (default python3)
#   extra arguments              go to the gpu and cpu runs, e.g. --set eval.enabled=false
#
# Wheels in .whl/ (git-ignored), if any, are installed into a temporary folder put on PYTHONPATH first.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}; PYTHON=${PYTHON:-python3}
MEMORY_BUDGET_S=${MEMORY_BUDGET_S:-240}; GPU_BUDGET_S=${GPU_BUDGET_S:-400}; CPU_BUDGET_S=${CPU_BUDGET_S:-300}
WORK=$(mktemp -d)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD:$WORK/site
fi
export PYTHONUNBUFFERED=1 MMDC_BUILD_DIR=${MMDC_BUILD_DIR:-$PWD/.mmdc_build}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  "$PYTHON" -c "import sys, torch, transformers, ray, deepspeed, peft
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
      transformers.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

COMMON=(--config configs/tiny.yaml --set run.iterations=1 --set data.caption_filter.enabled=false)
GPU=(--set engines.teacher.num_gpus=0.5 --set engines.teacher.dtype=float16
     --set engines.student.num_gpus=0.5 --set engines.student.dtype=float16
     --set align.num_workers=1 --set align.gpus_per_worker=1 --set align.precision=fp16
     --set tune.num_workers=1 --set tune.gpus_per_worker=1 --set tune.precision=fp16)

run() {  # name budget_s args...
  local name=$1 budget=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$budget" "$PYTHON" -m mmdc.run "${COMMON[@]}" "$@" --output "$WORK/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.txt"
  tar -C "$WORK" --exclude="$name/checkpoints" -czf "$OUT/$name.tar.gz" "$name" 2>/dev/null
}
if [ "$MEMORY_BUDGET_S" -gt 0 ]; then
  t0=$(date +%s)
  timeout "$MEMORY_BUDGET_S" "$PYTHON" scripts/gpu_memory_check.py --out "$WORK/memory" ${CPU_ONLY:+--cpu} \
    > "$OUT/memory.log" 2>&1
  echo "memory rc=$? wall_s=$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.txt"
  cp "$WORK/memory/memory_check.json" "$OUT/" 2>/dev/null
  grep -a "^\[memory check\]" "$OUT/memory.log" | tee -a "$OUT/summary.txt"
fi
if [ "$GPU_BUDGET_S" -gt 0 ]; then
  KIND=$("$PYTHON" -c "import sys; sys.argv = ['x']; sys.path.insert(0, 'scripts'); import gpu_memory_check as m
print(m.gpu_kind() or '')" 2>/dev/null)
  if [ -n "$KIND" ]; then
    "$PYTHON" -m mmdc.plan "${COMMON[@]}" "${GPU[@]}" "$@" --gpu "$KIND" --gpus 1 > "$OUT/plan_gpu.txt" 2>&1
    echo "plan_gpu rc=$? (plan of the gpu run on 1 x $KIND: plan_gpu.txt)" | tee -a "$OUT/summary.txt"
    grep -a -A3 "^align \|^tune " "$OUT/plan_gpu.txt" | grep -a "per GPU\|peak\|at load" | tee -a "$OUT/summary.txt"
  fi
  run gpu "$GPU_BUDGET_S" "${GPU[@]}" "$@"
  grep -a '"gpu_memory"' "$WORK/gpu/metrics.jsonl" 2>/dev/null | sed 's/^/measured /' | tee -a "$OUT/summary.txt"
fi
if [ "$CPU_BUDGET_S" -gt 0 ]; then run cpu "$CPU_BUDGET_S" "$@"; fi
