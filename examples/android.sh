#!/usr/bin/env bash
# Export a distilled student for an Android (or any ARM) phone: an ExecuTorch .pte with the XNNPACK delegate,
# INT8 (PT2E, calibrated on the run's TRAIN split), uint8 NHWC input as camera frames arrive. Then score
# images with it (IMAGES=folder), bench it against the run dir (the FP32 torch reference) on this machine,
# and print how to time it on the phone.
#
#   bash examples/android.sh runs/koniq-mvit
#
# The export checks FP32 against torch (fails beyond 1e-4), measures INT8 drift and the latency of both here,
# and counts the operators XNNPACK did not take (they run on slow portable kernels): read its notes.
set -euo pipefail
RUN=${1:?usage: android.sh RUN_DIR}
OUT=${OUT:-exports/android}
PROFILE=${PROFILE:-export/android-executorch-int8.yaml}
THREADS=${THREADS:-2}   # CPU threads here (and in the printed phone command)
EXTRA=${EXTRA:-}   # dataset options over the run's own (its config.yaml), e.g. "--dataset koniq --root /data/koniq10k"
EXPORT_EXTRA=${EXPORT_EXTRA:-}   # export options over the profile's, e.g. "--calib 64 --int8-stem int8"

# shellcheck disable=SC2086
kdiqa-edge export "$RUN" --profile "$PROFILE" --threads "$THREADS" --out "$OUT" $EXTRA $EXPORT_EXTRA
MODEL=$(ls "$OUT"/executorch-*/*.pte)
echo "ExecuTorch program: $MODEL (input 'image' uint8 [1, H, W, 3] RGB, output 'score' in 1..5;"
echo "  its preprocessing is inside it: the kdiqa_edge_meta method)"

# Score a few images with the .pte (the Python runtime of executorch, here on the host CPU)
IMAGES=${IMAGES:-}   # a folder or file of images to score
if [ -n "$IMAGES" ]; then
  kdiqa-edge score "$MODEL" "$IMAGES" --threads "$THREADS" --format csv > "$OUT/scores.csv"
  echo "scores: $OUT/scores.csv"
fi

# Latency, size, parameters and drift against the FP32 reference (the run dir)
# shellcheck disable=SC2086
kdiqa-edge bench "$MODEL" --reference "$RUN" --threads "$THREADS" --batch-sizes 1 --markdown "$OUT/bench.md" \
  --json-out "$OUT/bench.json" $EXTRA

echo "on the phone (adb): sh $OUT/executorch-int8/benchmark_on_device.sh"
grep -v '^#' "$OUT"/executorch-*/benchmark_on_device.sh | grep adb
