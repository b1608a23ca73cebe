#!/usr/bin/env bash
# Export a distilled student for an iPhone (CoreML ML Program, FP16) and bench it on a Mac.
#
#   bash examples/iphone.sh runs/koniq-mvit
#
# The conversion runs anywhere (Linux too); CoreML predictions run only on macOS. The .mlpackage takes an
# RGB image (CLIP's normalization is folded into the network) and returns `score` in 1..5.
set -euo pipefail
RUN=${1:?usage: iphone.sh RUN_DIR}
OUT=${OUT:-exports/iphone}
PROFILE=${PROFILE:-export/iphone-coreml-fp16.yaml}
EXTRA=${EXTRA:-}   # dataset options over the run's own (its config.yaml), e.g. "--dataset koniq --root /data/koniq10k"

# shellcheck disable=SC2086
kdiqa-edge export "$RUN" --profile "$PROFILE" --out "$OUT" $EXTRA
MODEL=$(ls -d "$OUT"/coreml-*/*.mlpackage)
echo "CoreML package: $MODEL (drag it into Xcode; input 'image', output 'score')"
if [ "$(uname -s)" = Darwin ]; then
  # shellcheck disable=SC2086
  kdiqa-edge bench "$MODEL" --reference "$RUN" --batch-sizes 1 --markdown "$OUT/bench.md" $EXTRA
else
  echo "not macOS: copy $OUT to a Mac and run 'kdiqa-edge bench $MODEL' there (pip install kdiqa-edge coremltools)"
fi
