#!/usr/bin/env bash
# Tutorial 7: a survey-sized run in shards: simulate, merge, fit, merge.
#
# On a SLURM cluster (sbatch on the PATH, galgen installed in the jobs' environment) the
# script submits the templates of pipelines/slurm/ as job arrays chained by dependencies,
# and returns at once; follow the jobs with `squeue --me`. Anywhere else (or with
# LOCAL=1, or GALGEN_QUICK=1) it runs the very same commands here, each shard as a
# background process, and prints the result.
#
# Writes under ./tutorial_out/07_cluster/:
#   shards/survey_{k}of{N}.h5   simulated shards        survey.h5       the merged survey
#   fits/sersic_{k}of{N}.h5     fitted shards (+ .fits)  fits/sersic.h5  the merged fit (+ fits/sersic.fits)
#   logs/                       one log per process (SLURM: per array task)
#
# Variables: GALGEN (the command; default `galgen`, e.g. GALGEN="python -m galgen"),
# PYTHON (for the summary at the end; default python3), N (galaxies), NSHARDS, LOCAL=1,
# GALGEN_QUICK=1 (the test suite's reduced size).
set -euo pipefail

GALGEN="${GALGEN:-galgen}"
PYTHON="${PYTHON:-python3}"
if [[ "${GALGEN_QUICK:-0}" == 1 ]]; then
    N="${N:-32}"; NSHARDS="${NSHARDS:-2}"; LOCAL=1
else
    N="${N:-512}"; NSHARDS="${NSHARDS:-4}"
fi
# the SLURM templates, found from this script's place in the repository
TEMPLATES="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/pipelines/slurm"

mkdir -p tutorial_out/07_cluster
cd tutorial_out/07_cluster
mkdir -p shards fits logs

if [[ "${LOCAL:-0}" != 1 ]] && command -v sbatch > /dev/null; then
    # --- on SLURM ------------------------------------------------------------------------
    # 1. simulate: one array task per shard (simulate_array.sbatch: --shard slurm reads
    #    SLURM_ARRAY_TASK_ID/COUNT), then one job that merges them once all have finished
    sim=$(sbatch --parsable --array=0-$((NSHARDS - 1)) \
          --export=ALL,SURVEY=sdss,N="$N",STAMP=64,PSF_SIZE=33,SEED=1,NAME=survey \
          "$TEMPLATES/simulate_array.sbatch")
    survey=$(sbatch --parsable --dependency=afterok:"$sim" --output=logs/merge_%j.out \
             --wrap "galgen merge shards/survey_*of${NSHARDS}.h5 --out survey.h5 --no-progress")
    # 2. fit every galaxy with a Sersic profile, one array task per shard of survey.h5
    fit=$(sbatch --parsable --dependency=afterok:"$survey" --array=0-$((NSHARDS - 1)) \
          --export=ALL,DATA=survey.h5,MODEL=sersic,NAME=sersic "$TEMPLATES/fit_array.sbatch")
    # 3. merge the fits into fits/sersic.h5 and fits/sersic.fits
    sbatch --dependency=afterok:"$fit" --export=ALL,NAME=sersic,NSHARDS="$NSHARDS" "$TEMPLATES/merge_fits.sbatch"
    # Training on GPUs is one job of train_torchrun.sbatch (torchrun, one process per GPU):
    #   sbatch --export=ALL,CONFIG=pipelines/configs/vae_sdss.yaml,DATA=survey.h5,OUT=runs/survey-vae \
    #       "$TEMPLATES/train_torchrun.sbatch"
    echo "submitted: simulate $sim, merge $survey, fit $fit; results in $(pwd)/fits/sersic.fits"
    exit 0
fi

# --- locally: the same stages, shards as background processes ----------------------------
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per process: the shards share the cores

# wait for every background process; fail if any failed
wait_all() {
    local pid status=0
    for pid in "$@"; do wait "$pid" || status=$?; done
    return "$status"
}

# 1. simulate N galaxies in NSHARDS shards k/N (0-based); {k} and {N} in --out are
#    replaced by the shard numbers. Shards are deterministic and disjoint.
pids=()
for ((k = 0; k < NSHARDS; k++)); do
    $GALGEN simulate --survey sdss --n "$N" --stamp 64 --psf-size 33 --seed 1 --shard "$k/$NSHARDS" \
        --out "shards/survey_{k}of{N}.h5" --no-progress > "logs/simulate_$k.log" 2>&1 &
    pids+=($!)
done
wait_all "${pids[@]}"
# 2. merge: the file an unsharded `galgen simulate --n N` writes
$GALGEN merge shards/survey_*of"$NSHARDS".h5 --out survey.h5 --no-progress

# 3. fit each shard of survey.h5 with a Sersic profile (Levenberg-Marquardt on the CPU)
pids=()
for ((k = 0; k < NSHARDS; k++)); do
    $GALGEN fit --model sersic --data survey.h5 --shard "$k/$NSHARDS" --device cpu \
        --out "fits/sersic_{k}of{N}.h5" --no-progress > "logs/fit_$k.log" 2>&1 &
    pids+=($!)
done
wait_all "${pids[@]}"
# 4. merge the fits: fits/sersic.h5 and its catalog fits/sersic.fits
$GALGEN merge fits/sersic_*of"$NSHARDS".h5 --out fits/sersic.h5 --no-progress

# Key numbers
$GALGEN summary survey.h5
"$PYTHON" - <<'EOF'
import numpy as np
from astropy.table import Table

cat = Table.read("fits/sersic.fits")
truth = Table.read("survey.h5", path="catalog")
print(f"merged catalog: {len(cat)} rows of {len(truth)} galaxies, indices {cat['index'][0]}..{cat['index'][-1]}")
print(f"Sersic chi2/dof: median {np.median(cat['chi2_dof']):.3f}; converged {np.mean(cat['status'] == 0):.2f}")
print(f"flux / true flux: median {np.median(cat['flux_map'] / truth['flux'][cat['index']]):.3f}")
EOF
