#!/usr/bin/env bash
# The seed's 1-device full training (12 epochs, 8 images per device, lr 0.04, apex O1) with evaluation.
#   bash scripts/train_full_1p.sh --data_path=/data/coco [--device_id=0] [--precision_mode=O1]
cd "$(dirname "$0")/.." && source scripts/common.sh && parse_args "$@"
run_case RetinaNet_ID0427_for_PyTorch_1p_full 1
