#!/usr/bin/env bash
# Train the conditional GAN recipe (pipelines/configs/gan_sdss_cond.yaml) and variants side
# by side on one GPU, and time galgen's fitters there (benchmarks/bench_fit.py --device cuda).
#
#   pipelines/gpu/train_gan_cond.sh OUTDIR
#
# Steps: (1) simulate the 50,000-galaxy bulge+disk SDSS training set of sdss-gan (seed 1001,
# the same arrays on any machine) with one GalSim process per core; meanwhile the GPU runs
# the fit benchmark; (2) train the variants at once, one process each, every one for at
# most TRAIN_S seconds (each writes best.pt at its best validation, so a run cut by the
# clock keeps its best weights); (3) pack each run's best.pt (without optimiser state),
# logs and last validation grid into OUTDIR/runs_*.tar.gz.
#
# Variants: cond-mag (the recipe), cond-mag-s1 (seed 1), cond-maghlr (mag and hlr),
# uncond (the installed sdss-gan recipe from scratch at equal steps: the control).
# Environment: N (50000), WORKERS (nproc - 1), TRAIN_S (270), STEPS (6000), DEVICE (auto),
# VAL_EVERY (250), BENCH_N (4096; 0 skips the fit benchmark), PYTHON (python3), WORK (/tmp/gg).
set -u
OUT=${1:?usage: train_gan_cond.sh OUTDIR}
N=${N:-50000}; TRAIN_S=${TRAIN_S:-270}; STEPS=${STEPS:-6000}; DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}; BENCH_N=${BENCH_N:-4096}
PY=${PYTHON:-python3}; W=${WORK:-/tmp/gg}
mkdir -p "$W/cfg" "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

base=pipelines/configs/gan_sdss_cond.yaml
VAL_EVERY=${VAL_EVERY:-250}
sed -e "s/^  steps: .*/  steps: $STEPS/" -e "s/^  precision: .*/  precision: fp32/" \
    -e "s/^  val_every: .*/  val_every: $VAL_EVERY/" -e "s/^  checkpoint_every: .*/  checkpoint_every: $VAL_EVERY/" \
    "$base" > "$W/cfg/cond-mag.yaml"
sed -e 's/^  seed: 0/  seed: 1/' "$W/cfg/cond-mag.yaml" > "$W/cfg/cond-mag-s1.yaml"
sed -e 's/^  conditions: \[mag\]/  conditions: [mag, hlr]/' "$W/cfg/cond-mag.yaml" > "$W/cfg/cond-maghlr.yaml"
sed -e '/^  conditions: /d' "$W/cfg/cond-mag.yaml" > "$W/cfg/uncond.yaml"
grep -q 'conditions: \[mag, hlr\]' "$W/cfg/cond-maghlr.yaml" || { echo "config variants failed"; exit 2; }

if [ "$BENCH_N" -gt 0 ]; then
  stamp "fit benchmark in the background ($BENCH_N galaxies, $DEVICE)"
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 timeout 330 $PY benchmarks/bench_fit.py --n "$BENCH_N" --device "$DEVICE" --threads 1 \
      --astrophot "" --budget 10 --posterior is,hmc --samples 100 --json "$OUT/bench_fit_gpu.json" \
      > "$OUT/bench_fit_gpu.log" 2>&1 &
  bench=$!
fi

stamp "simulate $N galaxies with $WORKERS workers"
$PY -m galgen simulate --survey sdss --n "$N" --stamp 64 --seed 1001 --psf-size 33 --workers "$WORKERS" \
    --out "$W/sdss_train.h5" --no-progress > "$W/simulate.log" 2>&1 || { tail -20 "$W/simulate.log"; exit 3; }
stamp "simulated"

pids=()
for v in cond-mag cond-mag-s1 cond-maghlr uncond; do
  OMP_NUM_THREADS=1 timeout "$TRAIN_S" $PY -m galgen train --config "$W/cfg/$v.yaml" --data "$W/sdss_train.h5" \
      --out "$W/runs/$v" --device "$DEVICE" --no-progress > "$W/train_$v.log" 2>&1 &
  pids+=($!)
done
stamp "training ${#pids[@]} runs for at most $TRAIN_S s each"
for p in "${pids[@]}"; do wait "$p"; done
stamp "training stopped"
[ -n "${bench:-}" ] && { wait "$bench"; stamp "benchmark done (exit $?)"; }

for v in cond-mag cond-mag-s1 cond-maghlr uncond; do
  d="$W/runs/$v"; tail -3 "$W/train_$v.log"; cp "$W/train_$v.log" "$d/" 2>/dev/null
  [ -f "$d/best.pt" ] && $PY - "$d/best.pt" <<'EOF'
import sys, torch
ck = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
ck["optimizer"], ck["rng_state"] = None, None
torch.save(ck, sys.argv[1])
EOF
  echo "== $v"; cat "$d/val_log.csv" 2>/dev/null | cut -c1-160
done
tar -czf "$OUT/runs_a.tar.gz" -C "$W/runs" --exclude=last.pt --exclude=model.pt --exclude=val_samples cond-mag cond-mag-s1 2>/dev/null
tar -czf "$OUT/runs_b.tar.gz" -C "$W/runs" --exclude=last.pt --exclude=model.pt --exclude=val_samples cond-maghlr uncond 2>/dev/null
ls -la "$OUT"
stamp done
