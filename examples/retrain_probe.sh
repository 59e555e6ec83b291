#!/usr/bin/env bash
# Retrains the probe ttc ships for the embedded model (verifiers/probes/smollm2-135m.pt), exactly as it was made:
# 8 samples on each of 680 TRAINING problems (reasoning-gym seed 1000, which no reported run uses: chain_sum 0-399,
# basic_arithmetic 0-179, products 0-99) and 4 on each of the first 100 of GSM8K's train file; the probe's
# features saved by the selector panel (self_eval left out: the probe does not need its questions), then one
# logistic regression. Concurrent decoding in bfloat16 is not bit-reproducible, so a refit's weights differ in
# their last digits. Its cost (the runs' prompts, samples and the probe's suffix tokens) is recorded in the
# probe's metadata and reported by every eval that uses it. (dataset.split=train only names GSM8K's problem ids
# gsm8k-train-N; the shipped probe's run lacked it, so its ids read gsm8k-test-N for the same train-file rows.)
#   bash examples/retrain_probe.sh [OUT_DIR] [PROBE_FILE]
set -euo pipefail
out=${1:-runs/probe}
probe=${2:-verifiers/probes/smollm2-135m.pt}
panel="strategy=panel strategy.self_eval=false budget.tokens=null concurrency=16 progress=false"
rg="dataset=reasoning_gym dataset.seed=1000"
ttc-eval $panel strategy.n=8 $rg dataset.task=chain_sum 'dataset.options={min_terms:2,max_terms:2,min_digits:1,max_digits:2}' \
  dataset.size=400 proposer.max_tokens=192 strategy.features_dir=$out/chain_sum/features hydra.run.dir=$out/chain_sum
ttc-eval $panel strategy.n=8 $rg dataset.task=basic_arithmetic 'dataset.options={min_terms:2,max_terms:3,max_digits:2}' \
  dataset.size=180 proposer.max_tokens=256 strategy.features_dir=$out/basic_arithmetic/features \
  hydra.run.dir=$out/basic_arithmetic
ttc-eval $panel strategy.n=8 $rg dataset.task=products 'dataset.options={min_terms:2,max_terms:2,min_digits:1,max_digits:2}' \
  dataset.size=100 proposer.max_tokens=192 strategy.features_dir=$out/products/features hydra.run.dir=$out/products
ttc-eval $panel strategy.n=4 dataset=gsm8k dataset.path=../shared/data/gsm8k/train.jsonl dataset.split=train dataset.limit=100 \
  proposer.max_tokens=384 strategy.features_dir=$out/gsm8k_train/features hydra.run.dir=$out/gsm8k_train
python -m ttc.evals.fit_probe $out/chain_sum $out/basic_arithmetic $out/products $out/gsm8k_train --out $probe
