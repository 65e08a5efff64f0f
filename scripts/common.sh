#!/usr/bin/env bash
# Shared by the train_*.sh scripts: the seed's (Ascend ModelZoo RetinaNet_for_PyTorch test/*.sh) arguments
# mapped onto torchrun and config overrides, and its closing lines.
#
#   --data_path=DIR       COCO root with annotations/, train2017/, val2017/ (required for COCO runs)
#   --batch_size=N        images per device (config default: 8, the Ascend setting)
#   --device_id=N         single-device runs: which device (sets ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES)
#   --precision_mode=M    O0 | O1 | O2 (apex opt levels) or fp32 | fp16 | bf16
#   --nnodes, --node_rank, --master_addr, --master_port, --local_addr   multi-node runs
#   --workdir=DIR         where checkpoints, logs and results go (default runs/<case name>)
#   --config=FILE         config file (default configs/retinanet_r50_fpn_1x_coco_npu.py)
# Anything else is passed through to the entry point (e.g. --config.optim.lr=0.02).
set -euo pipefail

data_path="" batch_size="" device_id="" precision_mode="" profiling=""
nnodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29688 local_addr=""
workdir="" config="configs/retinanet_r50_fpn_1x_coco_npu.py"
extra=()

parse_args() {
  for arg in "$@"; do
    case "$arg" in
      --data_path=*) data_path="${arg#*=}" ;;
      --batch_size=*) batch_size="${arg#*=}" ;;
      --device_id=*) device_id="${arg#*=}" ;;
      --precision_mode=*) precision_mode="${arg#*=}" ;;
      --profiling=*) profiling="${arg#*=}" ;;
      --nnodes=*) nnodes="${arg#*=}" ;;
      --node_rank=*) node_rank="${arg#*=}" ;;
      --master_addr=*) master_addr="${arg#*=}" ;;
      --master_port=*) master_port="${arg#*=}" ;;
      --local_addr=*) local_addr="${arg#*=}" ;;
      --workdir=*) workdir="${arg#*=}" ;;
      --config=*) config="${arg#*=}" ;;
      *) extra+=("$arg") ;;
    esac
  done
}

# run_case NAME NPROC [config overrides...]: trains and prints the seed's closing lines.
run_case() {
  local name="$1" nproc="$2"
  shift 2
  local overrides=("$@")
  workdir="${workdir:-runs/$name}"
  mkdir -p "$workdir"
  if [[ -n "$data_path" ]]; then overrides+=("--config.data.root=$data_path"); fi
  if [[ -n "$batch_size" ]]; then overrides+=("--config.data.images_per_device=$batch_size"); fi
  # O0/O1/O2 set the opt level (it decides the precision); fp32/fp16/bf16 set the precision and clear the
  # opt level the config may set (the default config sets O1). The command line cannot make an ml-collections
  # string placeholder None again: the empty value arrives as '', which retina_fn.precision.precision_from_config
  # reads as unset.
  case "$precision_mode" in
    O0|O1|O2) overrides+=("--config.train.opt_level=$precision_mode") ;;
    fp32|fp16|bf16) overrides+=("--config.train.opt_level=" "--config.train.precision=$precision_mode") ;;
    "") ;;
    *) echo "unknown --precision_mode=$precision_mode (O0 O1 O2 fp32 fp16 bf16)" >&2; exit 2 ;;
  esac
  if [[ -n "$profiling" ]]; then echo "note: --profiling is accepted for compatibility and ignored" >&2; fi
  if [[ -n "$device_id" && "$nproc" == 1 ]]; then
    export ASCEND_RT_VISIBLE_DEVICES="$device_id" CUDA_VISIBLE_DEVICES="$device_id" DEVICE_ID=0
  fi
  if [[ -n "$local_addr" ]]; then export HCCL_IF_IP="$local_addr"; fi
  local start end
  start=$(date +%s)
  python -m torch.distributed.run --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$nproc" \
    --master_addr="$master_addr" --master_port="$master_port" \
    -m experiments.coco_retinanet --config "$config" --workdir "$workdir" \
    "${overrides[@]}" "${extra[@]}" 2>&1 | tee "$workdir/$name.log"
  end=$(date +%s)
  if [[ "$node_rank" != 0 ]]; then return 0; fi
  python - "$workdir/results.json" "$((end - start))" <<'PY'
import json, math, sys
r = json.load(open(sys.argv[1]))
acc = r.get("bbox_mAP", float("nan"))
print(f"Final Performance images/sec : {r['train_images_per_s']:.2f}")
print(f"Final Train Accuracy : {acc:.3f}" if not math.isnan(acc) else "Final Train Accuracy : (not evaluated)")
print(f"E2E Training Duration sec : {sys.argv[2]}")
PY
}
