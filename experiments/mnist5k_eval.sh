#!/usr/bin/env bash
# Issue 18's evaluation: the shipped mnist5k rule vs the authors' MNIST weights and tuned
# SGD/Adam (100 tasks, 2 seeds), then the transfer rows (seed 0). One job at a time.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
R=runs/eval18
E=".venv/bin/mplp eval --no-progress --tasks 100 --tune-tasks 20"
PUB="--reference ../shared/reference/mnist_weights_00005000.npy --experiment mnist_20x8 --set task.name=mnist5k"
t() { local name=$1; shift; local s=$(date +%s); $E "$@" --out $R/$name > $R/$name.log 2>&1; echo "$name $(( $(date +%s) - s )) s" >> $R/times.txt; }
mkdir -p $R
for s in 0 1; do
  t mnist5k_20x8_s$s --pretrained mnist5k_20x8 --seed $s
  t published_mnist_s$s $PUB --seed $s
done
t mnist5k_20x8_step --pretrained mnist5k_20x8 --set network.activation=step
t mnist5k_20x8_wide100 --pretrained mnist5k_20x8 --set network.hidden=[100]
t mnist5k_20x8_deep50x50 --pretrained mnist5k_20x8 --set network.hidden=[50,50]
t mnist5k_20x8_28x28_wide100 --pretrained mnist5k_20x8 --set task.image_size=28 --set network.hidden=[100]
t mnist5k_20x8_on_digits --pretrained mnist5k_20x8 --set task.name=digits
t digits_20x8_on_mnist5k --pretrained digits_20x8 --set task.name=mnist5k
t digits_step_pes_on_mnist5k --pretrained digits_step_pes --set task.name=mnist5k
.venv/bin/mplp transfer $R/mnist5k_20x8_s0 $R/published_mnist_s0 $R/mnist5k_20x8_step $R/mnist5k_20x8_wide100 \
  $R/mnist5k_20x8_deep50x50 $R/mnist5k_20x8_28x28_wide100 $R/mnist5k_20x8_on_digits $R/digits_20x8_on_mnist5k \
  $R/digits_step_pes_on_mnist5k --out $R/transfer.md
echo done >> $R/times.txt
