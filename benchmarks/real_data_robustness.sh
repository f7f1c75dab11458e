#!/usr/bin/env bash
# Fair robustness benchmark on the two shared real multi-view sets (docs/results.md, "Fair
# comparisons on real multi-view data").
#
#   bash benchmarks/real_data_robustness.sh                 # all six methods, 5 seeds, both sets
#   METHODS=concat,euar SEEDS=2 bash benchmarks/real_data_robustness.sh --config.num_epochs=10
#   SETS=cub_googlenet_doc2vec_c10 bash benchmarks/real_data_robustness.sh   # one set (run two in parallel)
#
# Every method is trained with the same train-time corruption (--config.train_corruption=fair:
# half the samples clean, the others missing views at a rate ~ U(0, 0.5) and Gaussian noise of
# std ~ U(0, 4) on a random half of their views), then swept over sample-wise noise on a random
# half of the views (std 0-10, salt-and-pepper 0-0.5), missing views (rate 0-0.7), EMMR's
# one-missing-view ratio (0-0.5), all-view Gaussian noise (EUAR Table 3, variance 0-4) and, for
# CUB's two views, the fixed subsets (EUAR Table 2). Extra arguments go to every launcher call.
# Seeds already trained in a workdir are loaded, not retrained, so methods can be added later.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${DATA:-../shared/data}"
out="${OUT:-runs/real}"
seeds="${SEEDS:-5}"
methods="${METHODS:-euar,ease,samlml,emmr,concat,late_fusion}"
# One compilation per model shape for all seeds (and all later runs).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}"
common="sample_gaussian,sample_salt_pepper,missing_rate,drop_one,gaussian"
for set in ${SETS:-handwritten_6views cub_googlenet_doc2vec_c10}; do
  protocols="$common"
  if [[ "$set" == cub_* ]]; then protocols="$common,fixed_subsets"; fi
  "${PYTHON:-python}" -m experiments.robustness \
      --config="experiments/configs/default.py:concat,multiview:$data/$set.mat" \
      --methods="$methods" --seeds="$seeds" --config.train_corruption=fair \
      --protocols="$protocols" --workdir="$out/$set" "$@"
done
