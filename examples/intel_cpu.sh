#!/usr/bin/env bash
# Export a distilled student for an x86 CPU (Intel Xeon or Core; AMD runs it too): by default the OpenVINO INT8
# IR (model.int8.xml + .bin; nncf, calibrated on the run's TRAIN split; uint8 NHWC pixels in, normalized inside
# the model by OpenVINO's PrePostProcessor). PROFILE=export/cpu-auto.yaml instead measures every CPU runtime
# installed here (ONNX Runtime, OpenVINO, ExecuTorch) and ships the fastest within the drift bound to
# OUT/cpu-auto/: run it on the machine that will serve, since the winner depends on its instruction set (AMX,
# AVX512-BF16, VNNI). Then score images with it (IMAGES=folder) and bench it against the run dir (the FP32
# torch reference) on this machine.
#
#   bash examples/intel_cpu.sh runs/koniq-mvit
#   PROFILE=export/cpu-auto.yaml bash examples/intel_cpu.sh runs/koniq-mvit
#
# The export checks the f32 IR against torch (fails beyond 1e-4) and measures the INT8 drift and the latency of
# both here: read its notes. DEVICE picks OpenVINO's device for scoring and benching (CPU, GPU, NPU, AUTO).
set -euo pipefail
RUN=${1:?usage: intel_cpu.sh RUN_DIR}
OUT=${OUT:-exports/intel}
PROFILE=${PROFILE:-export/intel-cpu-openvino-int8.yaml}
THREADS=${THREADS:-2}   # inference threads here; set them to what the deployment uses
DEVICE=${DEVICE:-CPU}   # for an .xml pick (an .onnx or .pte pick of cpu-auto runs on the CPU)
EXTRA=${EXTRA:-}   # dataset options over the run's own (its config.yaml), e.g. "--dataset koniq --root /data/koniq10k"
EXPORT_EXTRA=${EXPORT_EXTRA:-}   # export options over the profile's, e.g. "--calib 64 --precision bf16"

# shellcheck disable=SC2086
kdiqa-edge export "$RUN" --profile "$PROFILE" --threads "$THREADS" --out "$OUT" $EXTRA $EXPORT_EXTRA
MODEL=$(find "$OUT" -mindepth 2 -maxdepth 2 \( -name 'model*.xml' -o -name 'model*.onnx' -o -name 'model*.pte' \) \
  | sort | head -n 1)
echo "model: $MODEL (its preprocessing and score range travel inside it; manifest: $OUT/manifest.json)"
PROVIDER=()
if [[ "$MODEL" == *.xml ]]; then PROVIDER=(--provider "$DEVICE"); fi

# Score a few images with it (torch-free: onnxruntime, openvino or executorch alone)
IMAGES=${IMAGES:-}   # a folder or file of images to score
if [ -n "$IMAGES" ]; then
  kdiqa-edge score "$MODEL" "$IMAGES" --threads "$THREADS" "${PROVIDER[@]}" --format csv > "$OUT/scores.csv"
  echo "scores: $OUT/scores.csv"
fi

# Latency, size, parameters and drift against the FP32 reference (the run dir)
# shellcheck disable=SC2086
kdiqa-edge bench "$MODEL" --reference "$RUN" --threads "$THREADS" "${PROVIDER[@]}" --batch-sizes 1 \
  --markdown "$OUT/bench.md" --json-out "$OUT/bench.json" $EXTRA
