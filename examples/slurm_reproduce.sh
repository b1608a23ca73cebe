#!/usr/bin/env bash
# The paper's sweep on a SLURM cluster: one teacher job per split, each split's distillations as a job array
# that starts when its teacher succeeded (afterok), at most MAX_PARALLEL of them at once.
#
#   bash examples/slurm_reproduce.sh /data/koniq10k            # on the login node: submits, returns
#   bash examples/slurm_reproduce.sh /data/koniq10k --status   # every run's state and log, the table so far
#   DRY_RUN=1 bash examples/slurm_reproduce.sh /data/koniq10k  # the job graph and sbatch parameters only
#
# Re-running the same line submits only what is missing or failed (queued and running jobs are left alone);
# preempted jobs are requeued by submitit and resume from their last epoch checkpoint. Needs the [cluster]
# extra: pip install 'kdiqa-edge[train,cluster]'.
set -euo pipefail
ROOT=${1:?usage: slurm_reproduce.sh DATASET_ROOT [--status]}
shift
OUT=${OUT:-runs/reproduce-koniq}
DATASET=${DATASET:-koniq}
PARTITION=${PARTITION:-gpu}
SEEDS=${SEEDS:-10}
MAX_PARALLEL=${MAX_PARALLEL:-8}
EXTRA=${EXTRA:-}   # e.g. "--account mylab --qos normal --slurm-extra constraint=a100" or smoke-test options

if [ "${1:-}" = "--status" ]; then
  exec kdiqa-edge reproduce --out "$OUT" --status
fi
# shellcheck disable=SC2086
kdiqa-edge reproduce --dataset "$DATASET" --root "$ROOT" --seeds "$SEEDS" \
  --variants full,soft,hard,regression --out "$OUT" \
  --launcher slurm --partition "$PARTITION" --gpus-per-job 1 --cpus-per-job 8 --mem 32G --time 12:00:00 \
  --max-parallel "$MAX_PARALLEL" ${DRY_RUN:+--dry-run} $EXTRA "$@"
