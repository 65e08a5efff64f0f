#!/usr/bin/env bash
# The seed's 8-device full training: the same configuration on 8 devices of one machine (64 images per step).
#   bash scripts/train_full_8p.sh --data_path=/data/coco
cd "$(dirname "$0")/.." && source scripts/common.sh && parse_args "$@"
run_case RetinaNet_ID0427_for_PyTorch_8p_full 8
