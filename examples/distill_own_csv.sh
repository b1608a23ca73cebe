#!/usr/bin/env bash
# Distil a student on your own images: a CSV with one row per image and its score.
#
#   bash examples/distill_own_csv.sh my_photos/ my_photos/ratings.csv
#
# The CSV needs an image column (paths relative to the image folder) and a score column; say the score's
# nominal range, whether lower is better (DMOS), and a reference/content column if several images share a
# scene (the split then keeps each scene on one side). Override the models with the variables below.
set -euo pipefail
IMAGES=${1:?usage: distill_own_csv.sh IMAGE_DIR CSV_FILE}
CSV=${2:?usage: distill_own_csv.sh IMAGE_DIR CSV_FILE}
OUT=${OUT:-runs/my-dataset}
STUDENT=${STUDENT:-mobilevit_s}
TEACHER=${TEACHER:-ViT-B-32:openai}
EPOCHS=${EPOCHS:-100}
EXTRA=${EXTRA:-}   # e.g. "--no-pretrained --teacher-epochs 1" for a smoke test

DATA=(--dataset csv --csv "$CSV" --image-dir "$IMAGES" --image-col "${IMAGE_COL:-image}" --mos-col "${MOS_COL:-mos}"
      --mos-range "${MOS_RANGE:-1,5}")
[ -n "${REF_COL:-}" ] && DATA+=(--ref-col "$REF_COL")
[ -n "${LOWER_BETTER:-}" ] && DATA+=(--lower-better)

# 1. look at the data first: counts, score ranges, what was skipped and why
kdiqa-edge data info "${DATA[@]}"
# 2. fine-tune the teacher and distil the student (one command)
# shellcheck disable=SC2086
kdiqa-edge distill "${DATA[@]}" --teacher "$TEACHER" --student "$STUDENT" --epochs "$EPOCHS" --out "$OUT" $EXTRA
# 3. a deployable ONNX (INT8 for ONNX Runtime on CPUs), calibrated on your training images
kdiqa-edge export "$OUT" --target onnx --precision int8 "${DATA[@]}" --out "$OUT/exports"
echo "summary: $OUT/summary.json   plots: $OUT/plots/   exports: $OUT/exports/manifest.json"
