#!/usr/bin/env bash
# The learned-features table (benchmarks/results/learned.md): RootSIFT / ALIKED-n16 / DISK x ASMK* (8k codebook,
# trained the same way for each: benchmarks/configs/dev_learned_asmk_star.yaml) x {no verification, mutual NN +
# usac, LightGlue} x {none, aQE}. Each run gives two rows: its "initial"/"verified" stage (no QE) and its
# "expanded" stage (aQE). Features and codebooks are cached in $RUNS/cache and shared by every run.
#   RUNS=runs/learned bash benchmarks/run_learned_table.sh [FEATURE ...]      # default: rootsift aliked disk
#   LG_TOP=10 LG_QUERIES=...: LightGlue re-ranks the top $LG_TOP (default 10: on 2 CPU cores a pair costs seconds)
#   PYTHONPATH=. python benchmarks/learned_table.py $RUNS                       # the markdown table + intervals
set -euo pipefail
DATA=${DATA:-../shared/data/instance_bench_dev}
RUNS=${RUNS:-runs/learned}
LG_TOP=${LG_TOP:-10}
export PYTHONPATH=${PYTHONPATH:-.}
bench() { nice -n 10 python -m d2r bench revisitop --gnd "$DATA/gnd.pkl" --images-root "$DATA" --cache "$RUNS/cache" \
    --config benchmarks/configs/dev_learned_asmk_star.yaml --quiet --no-report "$@"; }
for f in ${*:-rootsift aliked disk}; do
  [ -f $RUNS/${f}_none/metrics.json ] || bench --features $f --no-rerank --out $RUNS/${f}_none
  [ -f $RUNS/${f}_usac/metrics.json ] || bench --features $f --rerank --rerank-method usac --out $RUNS/${f}_usac
  if [ $f != rootsift ]; then
    [ -f $RUNS/${f}_lightglue/metrics.json ] || bench --features $f --rerank --rerank-method lightglue \
        --num-to-rerank $LG_TOP --out $RUNS/${f}_lightglue
  fi
done
