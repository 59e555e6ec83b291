#!/usr/bin/env bash
# Retrains the probe ttc ships for the embedded model (verifiers/probes/smollm2-135m.pt), exactly as it was made:
# 4 samples on each of 220 TRAINING problems (reasoning-gym seed 1000, which no reported run uses, and the first
# 40 of GSM8K's train file), the probe's features saved by the selector panel, then one logistic regression.
# About 35 minutes on a 2-core CPU (concurrent decoding in bfloat16 is not bit-reproducible, so the refitted
# weights differ in their last digits). Cost: ~123k computed tokens, recorded in the probe's metadata.
#   bash examples/retrain_probe.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/probe}
panel="strategy=panel strategy.n=4 budget.tokens=null concurrency=16"
rg="dataset=reasoning_gym dataset.seed=1000"
ttc-eval $panel $rg dataset.task=chain_sum 'dataset.options={min_terms:2,max_terms:2,min_digits:1,max_digits:2}' \
  dataset.size=150 dataset.limit=80 proposer.max_tokens=192 strategy.features_dir=$out/chain_sum/features \
  hydra.run.dir=$out/chain_sum
ttc-eval $panel $rg dataset.task=basic_arithmetic 'dataset.options={min_terms:2,max_terms:3,max_digits:2}' \
  dataset.size=120 dataset.limit=60 proposer.max_tokens=256 strategy.features_dir=$out/basic_arithmetic/features \
  hydra.run.dir=$out/basic_arithmetic
ttc-eval $panel $rg dataset.task=products 'dataset.options={min_terms:2,max_terms:2,min_digits:1,max_digits:2}' \
  dataset.size=80 dataset.limit=40 proposer.max_tokens=192 strategy.features_dir=$out/products/features \
  hydra.run.dir=$out/products
ttc-eval $panel dataset=gsm8k dataset.path=../shared/data/gsm8k/train.jsonl dataset.limit=40 proposer.max_tokens=384 \
  strategy.features_dir=$out/gsm8k_train/features hydra.run.dir=$out/gsm8k_train
python -m ttc.evals.fit_probe $out/chain_sum $out/basic_arithmetic $out/products $out/gsm8k_train \
  --out verifiers/probes/smollm2-135m.pt
