"""A fake SLURM for the launcher tests: scripts put on PATH in place of sbatch and sacct."""

FAKE_SBATCH = """#!/bin/bash
# keeps each submission script as sbatch.N and answers with the next job id, as sbatch does; refuses an
# unknown partition as sbatch does
dir=$(dirname "$0")
if grep -q -- '--partition=nope' "$1"; then
  echo "sbatch: error: invalid partition specified: nope" >&2
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 ))
echo $n > "$dir/count"
cp "$1" "$dir/sbatch.$n"
echo "Submitted batch job $n"
"""
FAKE_SACCT = """#!/bin/bash
# the states the test writes into the file `states` beside it (JobID|State|NodeList lines)
echo "JobID|State|NodeList"
cat "$(dirname "$0")/states" 2>/dev/null
"""
