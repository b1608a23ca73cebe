#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: the CUDA paths that cannot run on the CPU machines.
#
#   bash benchmarks/device/gpu_check.sh stash   # a call that carries one part of onnxruntime-gpu: keep it
#   bash benchmarks/device/gpu_check.sh         # install the carried wheels, then every check below
#   KDIQA_CHECK_DEVICE=cpu bash benchmarks/device/gpu_check.sh   # the same steps on a CPU, tiny: a dry run
#                            (it installs no wheels unless KDIQA_CHECK_WHEELS=install)
#
# benchmarks/device/README.md says which calls carry what. Checks, each under its own time limit, each one
# reported as ok / FAILED / skipped in $OUT/summary.md whatever the others do:
#   1. environment: the GPU, torch and onnxruntime versions, whether the CUDA execution provider starts
#   2. teacher fine-tune step (ViT-B/32 image tower, batch 64): AMP (bf16) + channels_last, the engine vs the
#      bare train step, then the same with --compile (benchmarks/bench_finetune.py)
#   3. distillation epoch (resnet18 from a ViT-B/32 teacher, 224 px) vs the bare student step (bench_distill.py)
#   4. the CLI on CUDA: data synth -> distill (AMP, channels_last) -> export --precision auto, where the ORT
#      CUDA execution provider's FP16 and FP32 candidates are measured beside the CPU ones -> bench on CUDA
# Weights are random init (nothing can be downloaded there): speeds are real, accuracy is not.
# Results: $OUT (the device tool brings it back): summary.md, check.log, env.json, finetune.md, distill.md,
# auto.txt, manifest.json, bench.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/kdiqa-gpu-check}
STASH=/tmp/kdiqa-ort  # parts of the onnxruntime-gpu wheel, gathered over several calls
mkdir -p "$OUT"

if [ "${1:-}" = "stash" ]; then
  shopt -s nullglob
  mkdir -p "$STASH"
  for part in .whl/ort/part-* .whl/ort/SHA256SUMS .whl/ort/WHEEL; do cp "$part" "$STASH/"; done
  echo "stashed in $STASH:"; ls -l "$STASH"
  exit 0
fi

DEVICE=${KDIQA_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = "cuda" ]; then
  BATCH=64 STEPS=30 IMAGES=1024 REFS=6 EPOCHS=2 TEACHER=ViT-B-32:random ARCH=ViT-B-32 STUDENT=resnet18
else  # the dry run: the same commands, small enough for two CPU cores
  BATCH=8 STEPS=2 IMAGES=16 REFS=2 EPOCHS=1 TEACHER=tiny ARCH=tiny STUDENT=test_resnet
fi
WORK=$(mktemp -d /tmp/kdiqa-gpu-check-XXXX)
trap 'rm -rf "$WORK"' EXIT
export KDIQA_CACHE=$WORK/cache PYTHONUNBUFFERED=1
LOG=$OUT/check.log
: > "$LOG"
RESULTS=()

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

BUDGET=${KDIQA_CHECK_BUDGET:-480}  # seconds for all the checks: the call's own limit (540 s) must not cut the summary
DEADLINE=$((SECONDS + BUDGET))

step() {  # NAME SECONDS COMMAND...: run it under its limit (and the budget left), log it, record how it ended
  local name=$1 seconds=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ $left -lt 15 ]; then
    skip "$name" "no time left of the ${BUDGET} s budget"
    return 1
  fi
  [ $seconds -gt $left ] && seconds=$left
  say "== $name (limit ${seconds} s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$seconds" "$@" >> "$LOG" 2>&1
  local rc=$? took=$((SECONDS - start))
  local status=ok
  [ $rc -eq 124 ] && status="FAILED (over ${seconds} s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  RESULTS+=("| $name | $status | ${took} s |")
  say "   $name: $status in ${took} s"
  summary
  return $rc
}

summary() {  # written after every step, so a call cut short still brings back what ran
  {
    echo "# GPU check: $(date -u +%Y-%m-%dT%H:%MZ), device $DEVICE"
    echo
    echo "onnxruntime-gpu installed: $ORT_GPU; CUDA execution provider starts: ${CUDA_EP:-not asked yet}"
    echo
    echo "| check | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
  } > "$OUT/summary.md"
}

skip() { RESULTS+=("| $1 | skipped: $2 | |"); say "   $1: skipped: $2"; summary; }

# --- install what the machine lacks (benchmarks/device/wheels.sh made these) ------------------------------
SITE=/tmp/kdiqa-site
install_wheels() {
  python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$@" >> "$LOG" 2>&1
}
WHEELS=${KDIQA_CHECK_WHEELS:-$([ "$DEVICE" = cuda ] && echo install || echo skip)}  # the dry run uses .venv
if [ "$WHEELS" = install ] && compgen -G ".whl/small/*.whl" > /dev/null; then
  install_wheels .whl/small/*.whl && say "installed: $(ls .whl/small | tr '\n' ' ')" \
    || say "installing .whl/small FAILED (see check.log)"
fi
ORT_GPU=no
if [ "$WHEELS" = install ] && { [ -f .whl/ort/SHA256SUMS ] || [ -f "$STASH/SHA256SUMS" ]; }; then
  bash "$ROOT/benchmarks/device/gpu_check.sh" stash > /dev/null
  wheel=$(cat "$STASH/WHEEL")
  if ! (cd "$STASH" && sha256sum --quiet -c <(grep ' part-' SHA256SUMS)) >> "$LOG" 2>&1; then
    say "onnxruntime-gpu: parts missing or damaged (have: $(cd "$STASH" && ls part-* 2>/dev/null | tr '\n' ' '))"
  elif ! { cat "$STASH"/part-* > "$STASH/$wheel" \
           && (cd "$STASH" && sha256sum --quiet -c <(grep " $wheel\$" SHA256SUMS)); } >> "$LOG" 2>&1; then
    say "onnxruntime-gpu: the joined parts do not give $wheel (checksum)"
  elif ! install_wheels "$STASH/$wheel"; then
    say "onnxruntime-gpu: $wheel did not install here (see check.log)"
  else
    ORT_GPU=yes
    say "installed $wheel"
  fi
fi
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
# the CUDA libraries of the machine's torch (pip's nvidia-* wheels) for onnxruntime-gpu, which lives apart
NVIDIA_LIBS=$(python3 -c "import glob, os, site; print(':'.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], 'nvidia', '*', 'lib')))))" 2>/dev/null)
export LD_LIBRARY_PATH=${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
KDIQA=(python3 -m kdiqa_edge)

# --- 1. environment ----------------------------------------------------------------------------------------
step environment 120 python3 benchmarks/device/environment.py --json "$OUT/env.json"
CUDA_EP=$(python3 -c "import json, sys; print('yes' if json.load(open(sys.argv[1]))['cuda_provider_starts'] else 'no')" "$OUT/env.json" 2>/dev/null || echo no)
CUDA_WHY=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['cuda_provider_problem'] or '')" "$OUT/env.json" 2>/dev/null | tr '|' '/')

# --- 2. teacher fine-tune step: AMP bf16 + channels_last, then --compile --------------------------------------
step "fine-tune step ($ARCH, batch $BATCH)" 150 python3 benchmarks/bench_finetune.py --device "$DEVICE" \
  --arch "$ARCH" --batch-size "$BATCH" --steps "$STEPS" --markdown "$OUT/finetune.md"
if [ "$DEVICE" = "cuda" ]; then
  step "fine-tune step --compile" 240 python3 benchmarks/bench_finetune.py --device cuda --arch "$ARCH" \
    --batch-size "$BATCH" --steps "$STEPS" --compile --markdown "$OUT/finetune.md"
else
  skip "fine-tune step --compile" "torch.compile is measured on CUDA only"
fi

# --- 3. distillation epoch vs the bare student step ---------------------------------------------------------
step "distill epoch ($STUDENT from $TEACHER)" 180 python3 benchmarks/bench_distill.py --device "$DEVICE" \
  --teacher "$TEACHER" --student "$STUDENT" --images "$IMAGES" --batch-size "$BATCH" --repeats 2 \
  --markdown "$OUT/distill.md"

# --- 4. the CLI on CUDA, and the ORT CUDA execution provider in --precision auto ----------------------------
SET=$WORK/set RUN=$WORK/run EXPORTS=$WORK/exports
step "data synth" 60 "${KDIQA[@]}" data synth "$SET" --refs "$REFS" \
&& step "distill ($STUDENT, $DEVICE)" 240 "${KDIQA[@]}" distill --dataset synthetic --root "$SET" \
  --teacher "$TEACHER" --teacher-epochs 1 --student "$STUDENT" --no-pretrained --epochs "$EPOCHS" \
  --batch-size 32 --device "$DEVICE" --quiet --out "$RUN"
if [ -d "$RUN" ]; then
  if [ "$CUDA_EP" = yes ]; then
    CANDIDATES=int8:qdq-all+stem-int8,fp16:cuda,fp32:cuda
  else
    CANDIDATES=int8:qdq-all+stem-int8
    skip "ORT CUDA execution provider" "it does not start here (onnxruntime-gpu installed: $ORT_GPU${CUDA_WHY:+; $CUDA_WHY}); auto runs CPU candidates only"
  fi
  step "export --precision auto ($CANDIDATES)" 300 "${KDIQA[@]}" export "$RUN" --dataset synthetic --root "$SET" \
    --target onnx --precision auto --max-drift 1 --candidates "$CANDIDATES" --calib 16 --out "$EXPORTS"
  python3 - "$EXPORTS/manifest.json" > "$OUT/auto.txt" 2>> "$LOG" <<'EOF'
import json, sys
entry = json.load(open(sys.argv[1]))["exports"]["onnx-auto"]
print("\n".join(entry.get("notes", [])))
print()
for row in entry["details"]["auto"]["candidates"]:
    lat = row.get("latency", {})
    print(row["name"], row["provider"], row["status"], row.get("reason") or "",
          {b: v.get("p50_ms") for b, v in lat.items()}, row.get("drift", {}).get("max_abs_diff_vs_fp32"))
EOF
  cp "$EXPORTS/manifest.json" "$OUT/manifest.json" 2>/dev/null
  if [ "$CUDA_EP" = yes ] && [ -f "$EXPORTS/onnx-auto/model.onnx" ]; then
    step "bench the pick on CUDA" 120 "${KDIQA[@]}" bench "$EXPORTS/onnx-auto/model.onnx" --reference "$RUN" \
      --dataset synthetic --root "$SET" --provider cuda --batch-sizes 1,8,64 --runs 50 --markdown "$OUT/bench.md"
  fi
fi

summary
cat "$OUT/summary.md"
