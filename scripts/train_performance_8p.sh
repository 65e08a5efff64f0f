#!/usr/bin/env bash
# The seed's 8-device performance run: 1 epoch cut at 500 steps, no validation; prints images/sec.
#   bash scripts/train_performance_8p.sh --data_path=/data/coco
cd "$(dirname "$0")/.." && source scripts/common.sh && parse_args "$@"
run_case RetinaNet_ID0427_for_PyTorch_8p_perf 8 --config.optim.epochs=1 --config.train.performance_steps=500 \
  --config.train.validate=False
