#!/usr/bin/env bash
# Round 4 of benchmarks/results/dev_results.md (issue 13): feature-side methods, each in its own cache with its own
# 8k codebook trained with the recipe of run_qe_table.sh; every row is compared with runs/dev/base.
#   RUNS=runs DATA=/work/shared/data/instance_bench_dev bash benchmarks/run_feats_table.sh upright
#   RUNS=runs DATA=/work/shared/data/instance_bench_dev bash benchmarks/run_feats_table.sh asift
#   PYTHONPATH=. python benchmarks/qe_table.py runs/dev_upright base usac_aqe usac_ham usac_ham_aqe
set -euo pipefail
KIND=${1:?usage: run_feats_table.sh upright|asift|asift_spread}
DATA=${DATA:-../shared/data/instance_bench_dev}
RUNS=${RUNS:-runs}
export PYTHONPATH=${PYTHONPATH:-.}
case $KIND in
  upright) OPT="--set features.options.upright=true" ;;
  asift) OPT="--set features.options.affine_simulation=true --set features.options.affine_min_distance=0" ;;
  asift_spread) OPT="--set features.options.affine_simulation=true --set features.options.affine_min_distance=1.4142" ;;
  *) echo "unknown feature kind $KIND" >&2; exit 2 ;;
esac
OUT=$RUNS/dev_$KIND
CACHE=$OUT/cache
CFG=benchmarks/configs/dev_rootsift_asmk_star.yaml
[ -d "$(ls -d $CACHE/db-* 2>/dev/null | head -1)" ] || \
  python -m d2r bench revisitop --gnd "$DATA/gnd.pkl" --images-root "$DATA" --cache "$CACHE" --quiet --config $CFG \
    $OPT --codebook-size 1024 --codebook-iterations 1 --no-rerank --no-report --out $OUT/_features
[ -f $CACHE/k8192.npz ] || python -m d2r train-codebook --store "$(ls -d $CACHE/db-* | head -1)" --size 8192 \
    --method minibatch --iterations 3 --out $CACHE/k8192.npz --quiet
bench() { python -m d2r bench revisitop --gnd "$DATA/gnd.pkl" --images-root "$DATA" --cache "$CACHE" --quiet \
            --codebook $CACHE/k8192.npz --no-report $OPT "$@"; }
HAM="--rerank --rerank-method usac --set rerank.correspondences=hamming"
bench --config $CFG --no-rerank --out $OUT/base
bench --config $CFG --rerank --rerank-method usac --out $OUT/usac
bench --config $CFG --rerank --rerank-method usac --query-expansion aqe --out $OUT/usac_aqe
bench --config $CFG $HAM --out $OUT/usac_ham
bench --config $CFG $HAM --query-expansion aqe --out $OUT/usac_ham_aqe
# ASIFT only: min_inliers recalibrated with the round-2 rule (smallest count above every chance count of the
# non-matching top-100 pairs, benchmarks/calibrate_inliers.py --run $OUT/base --cache $CACHE [--correspondences
# hamming --codebook $CACHE/k8192.npz]): ratio max 33 -> 34, hamming max 68 -> 69.
if [ "$KIND" = asift ]; then
  bench --config $CFG --rerank --rerank-method usac --min-inliers 34 --query-expansion aqe --out $OUT/usac34_aqe
  bench --config $CFG $HAM --min-inliers 69 --query-expansion aqe --out $OUT/usac_ham69_aqe
fi
