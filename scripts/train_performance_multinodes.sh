#!/usr/bin/env bash
# The seed's multi-node performance run, one invocation per machine (8 devices each), 1 epoch, no validation:
#   bash scripts/train_performance_multinodes.sh --data_path=/data/coco --batch_size=8 --nnodes=2 \
#        --node_rank=0 --local_addr=10.0.0.1 --master_addr=10.0.0.1 [--master_port=23333]
#   (and --node_rank=1 --local_addr=10.0.0.2 on the second machine)
# Set NPROC_PER_NODE to use another number of devices per machine.
cd "$(dirname "$0")/.." && source scripts/common.sh
master_port=23333
parse_args "$@"
run_case RetinaNet_ID0427_for_PyTorch_multinodes_perf "${NPROC_PER_NODE:-8}" --config.optim.epochs=1 \
  --config.train.validate=False
