#!/usr/bin/env bash
# Here, before a GPU check: the wheels the lent GPU machine lacks, for its Python 3.12 (x86-64), in .whl/.
#
#   bash benchmarks/device/wheels.sh
#
# .whl/small/   open_clip, timm (our pinned version: the export patches its MobileViT block), onnxslim,
#               ftfy, wcwidth, openpyxl, et_xmlfile: about 6 MB, carried with the check itself
# .whl/ort/     onnxruntime-gpu (the CUDA execution provider; the machine's onnxruntime is the CPU build),
#               about 256 MB: more than one call may carry (64 MiB), so split into parts of 49 MiB that
#               calls carry one at a time, with their SHA-256 sums (benchmarks/device/README.md)
#
# Versions are those of this checkout's environment where it has the package (.venv), else pinned here.
set -euo pipefail
cd "$(dirname "$0")/../.."

ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}  # built for CUDA 13 and cuDNN 9, as the machine's torch is
PART=${PART:-49m}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)

version() {  # the version in .venv, or the fallback
  local found
  found=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true)
  echo "${found:-$2}"
}

download() {  # DEST SPEC...
  local dest=$1; shift
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$dest" "$@"
}

rm -rf .whl/small .whl/ort
mkdir -p .whl/small .whl/ort
download .whl/small "open_clip_torch==$(version open_clip_torch 3.3.0)" "timm==$(version timm 1.0.31)" \
  "onnxslim==$(version onnxslim 0.1.98)" "ftfy==$(version ftfy 6.3.1)" "wcwidth==$(version wcwidth 0.9.4)" \
  "openpyxl==$(version openpyxl 3.1.5)" "et_xmlfile==$(version et_xmlfile 2.0.0)"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
download "$scratch" "$ORT_GPU"
wheel=$(ls "$scratch"/*.whl)
name=$(basename "$wheel")
(cd .whl/ort && split -b "$PART" -d -a 2 "$wheel" part- && echo "$name" > WHEEL)
(cd "$scratch" && sha256sum "$name") > .whl/ort/SHA256SUMS
(cd .whl/ort && sha256sum part-* >> SHA256SUMS)

echo "wheels in .whl/ (git-ignored):"
du -sh .whl/small
ls .whl/small
echo "$name in $(ls .whl/ort/part-* | wc -l) parts of at most $PART:"
ls -l .whl/ort
