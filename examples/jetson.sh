#!/usr/bin/env bash
# Export a distilled student for a Jetson Orin (TensorRT INT8) and bench it there.
#
#   bash examples/jetson.sh runs/koniq-mvit
#
# A TensorRT engine only runs on the GPU and TensorRT version it was built with, so the engine is built ON
# the Jetson. On any other machine this writes the TensorRT-ready INT8 ONNX and the equivalent trtexec
# command (exit code 4 from `export`, handled below): copy the folder to the Jetson and run the same script.
set -euo pipefail
RUN=${1:?usage: jetson.sh RUN_DIR}
OUT=${OUT:-exports/jetson}
PROFILE=${PROFILE:-export/jetson-orin-tensorrt-int8.yaml}
EXTRA=${EXTRA:-}   # dataset options over the run's own (its config.yaml), e.g. "--dataset koniq --root /data/koniq10k"

# shellcheck disable=SC2086
if kdiqa-edge export "$RUN" --profile "$PROFILE" --out "$OUT" $EXTRA; then
  MODEL=$(ls "$OUT"/tensorrt-*/*.engine)
else
  code=$?
  [ "$code" -eq 4 ] || exit "$code"
  echo "no TensorRT on this machine: on the Jetson, run $OUT/tensorrt-int8/trtexec.sh or this script again"
  MODEL=$(ls "$OUT"/tensorrt-*/*.onnx)   # bench the Q/DQ ONNX here; the engine on the device
fi
# Bench needs no torch: on the Jetson, `pip install kdiqa-edge` plus JetPack's tensorrt is enough.
# shellcheck disable=SC2086
kdiqa-edge bench "$MODEL" --reference "$RUN" --batch-sizes 1,8 --markdown "$OUT/bench.md" \
  --json-out "$OUT/bench.json" --plot "$OUT/bench.png" $EXTRA
