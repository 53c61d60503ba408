#!/usr/bin/env bash
# The dev-data results table (benchmarks/results/dev_results.md): RootSIFT, ASMK* vs R-ASMK* vs regional search,
# grid and density proposers, 1k and 8k codebooks, each run reporting metrics before and after GV.
# Features and codebooks are cached in $RUNS/cache and shared by every run.  Usage, from the repository root:
#   RUNS=runs/dev bash benchmarks/run_dev_table.sh [step ...]      # steps: 1k sweep 8k (default: all)
#   PYTHONPATH=. python benchmarks/dev_table.py runs/dev            # prints the markdown table
set -euo pipefail
DATA=${DATA:-../shared/data/instance_bench_dev}
RUNS=${RUNS:-runs/dev}
CACHE=$RUNS/cache
export PYTHONPATH=${PYTHONPATH:-.}
bench() { python -m d2r bench revisitop --gnd "$DATA/gnd.pkl" --images-root "$DATA" --cache "$CACHE" --quiet "$@"; }
CONFIGS="asmk_star rasmk_star_density search_density rasmk_star_grid search_grid"
steps=${*:-1k sweep 8k}
for step in $steps; do
  case $step in
    1k)
      for c in $CONFIGS; do
        bench --config benchmarks/configs/dev_rootsift_$c.yaml --out $RUNS/${c}_k1024
      done ;;
    sweep)  # GV putative-match distance (ASMK*, 1k)
      for d in 0.4 0.6 0.9; do
        bench --config benchmarks/configs/dev_rootsift_asmk_star.yaml --rerank-distance $d --out $RUNS/asmk_star_k1024_gv$d
      done ;;
    8k)
      # Lloyd k-means for 8,192 words on 110k descriptors takes > 1 h on this 2-core box: mini-batch, 3 epochs.
      [ -f $CACHE/k8192.npz ] || python -m d2r train-codebook --store "$(ls -d $CACHE/db-* | head -1)" --size 8192 \
          --method minibatch --iterations 3 --out $CACHE/k8192.npz --quiet
      for c in $CONFIGS; do
        bench --config benchmarks/configs/dev_rootsift_$c.yaml --codebook $CACHE/k8192.npz --out $RUNS/${c}_k8192
      done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
