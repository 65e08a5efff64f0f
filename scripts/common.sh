#!/usr/bin/env bash
# Shared by the train_*.sh scripts: the seed's (Ascend ModelZoo RetinaNet_for_PyTorch test/*.sh) arguments
# mapped onto torchrun and config overrides, and its closing lines.
#
#   --data_path=DIR       COCO root with annotations/, train2017/, val2017/ (required for COCO runs)
#   --batch_size=N        images per device (config default: 8, the Ascend setting)
#   --device_id=N         single-device runs: which device (sets ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES)
#   --precision_mode=M    O0 | O1 | O2 (apex opt levels) or fp32 | fp16 | bf16
#   --nnodes, --node_rank, --master_addr, --master_port, --local_addr   multi-node runs
#   --nnodes=MIN:MAX      elastic: nodes may be lost and join between MIN and MAX (torchrun's c10d rendezvous at
#                         --master_addr:--master_port, hosted by the --node_rank=0 machine). The run keeps its
#                         global batch (--config.optim.global_batch, default images per device x processes per node
#                         x MAX) and derives the accumulation for the processes present (optim.accum_steps=auto)
#   --max_restarts=N      torchrun --max-restarts: worker-group restarts after failures (default 0, elastic 3)
#   --global_batch=N      elastic runs: the global batch to keep instead of that default
#   --workdir=DIR         where checkpoints, logs and results go (default runs/<case name>)
#   --config=FILE         config file (default configs/retinanet_r50_fpn_1x_coco_npu.py)
# Anything else is passed through to the entry point (e.g. --config.optim.lr=0.02).
set -euo pipefail

data_path="" batch_size="" device_id="" precision_mode="" profiling=""
nnodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29688 local_addr="" max_restarts="" global_batch=""
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
      --max_restarts=*) max_restarts="${arg#*=}" ;;
      --global_batch=*) global_batch="${arg#*=}" ;;
      --workdir=*) workdir="${arg#*=}" ;;
      --config=*) config="${arg#*=}" ;;
      *) extra+=("$arg") ;;
    esac
  done
}

# config_value FIELD: the config file's value of a dotted field (e.g. data.images_per_device).
config_value() {
  python - "$config" "$1" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("config_file", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
value = module.get_config()
for key in sys.argv[2].split("."):
    value = value[key]
print(value)
PY
}

# elastic_launch NAME NPROC: sets `launch` (torchrun's rendezvous options) and adds the global-batch overrides for
# --nnodes=MIN:MAX; names the node counts of the range that cannot make the global batch (refused at start).
elastic_launch() {
  local name="$1" nproc="$2" min_nodes="${nnodes%%:*}" max_nodes="${nnodes##*:}" is_host=0
  local per_device="${batch_size:-$(config_value data.images_per_device)}"
  local global="${global_batch:-$((per_device * nproc * max_nodes))}" n
  overrides+=("--config.optim.accum_steps=auto" "--config.optim.global_batch=$global")
  for ((n = min_nodes; n <= max_nodes; n++)); do
    if ((global % (per_device * nproc * n))); then
      echo "note: $n node(s) x $nproc x $per_device images cannot make the global batch of $global; the run refuses" \
        "to start with that membership" >&2
    fi
  done
  if [[ "$node_rank" == 0 ]]; then is_host=1; fi
  # torch 2.13's shared rendezvous store stalls a node that joins a running group: one store per round instead
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  launch=(--nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d --rdzv_endpoint="$master_addr:$master_port"
          --rdzv_id="$name" --rdzv_conf="is_host=$is_host" --max-restarts="${max_restarts:-3}")
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
  local launch=(--nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$nproc" --master_addr="$master_addr"
                --master_port="$master_port" --max-restarts="${max_restarts:-0}")
  if [[ "$nnodes" == *:* ]]; then elastic_launch "$name" "$nproc"; fi
  python -m experiments.launch "${launch[@]}" -m experiments.coco_retinanet --config "$config" \
    --workdir "$workdir" "${overrides[@]}" "${extra[@]}" 2>&1 | tee "$workdir/$name.log"
  if [[ "$node_rank" != 0 ]]; then return 0; fi
  # the whole run's figures from results.json, every segment of a resumed or resized run included
  python - "$workdir/results.json" <<'PY'
import json, sys
from retina_fn.engine.reporting import seed_closing_lines
print("\n".join(seed_closing_lines(json.load(open(sys.argv[1])))))
PY
}
