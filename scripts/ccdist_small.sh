#!/usr/bin/env bash
# The CC-Dist experiment at CPU scale (issue 6): DM-small on MNIST and Fashion-MNIST, eps 0.1;
# a PGD-AT teacher (seed 0), then CC-IBP and CC-Dist students with the same budget, 3 seeds each;
# prints clean / PGD / IBP-certified accuracy as mean ± std. Re-running skips finished runs.
#   bash scripts/ccdist_small.sh [--jobs N] [key=value ...]
set -euo pipefail
extra=("$@")
[ ${#extra[@]} -eq 0 ] && extra=(progress=true)
for ds in mnist fashion-mnist; do
  certdist sweep configs/small/${ds}_pgd-at-teacher.yaml "${extra[@]}" --seeds 0
  certdist sweep configs/small/${ds}_cc-ibp.yaml configs/small/${ds}_cc-dist.yaml "${extra[@]}" --seeds 0 1 2
done
certdist table runs/small/mnist_pgd-at-teacher runs/small/mnist_cc-ibp runs/small/mnist_cc-dist \
  runs/small/fashion-mnist_pgd-at-teacher runs/small/fashion-mnist_cc-ibp runs/small/fashion-mnist_cc-dist
