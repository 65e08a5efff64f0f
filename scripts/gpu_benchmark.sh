#!/usr/bin/env bash
# The GPU suite: one `python -m experiments.benchmark` invocation per row for RetinaNet R50-FPN 1x
# (configs/retinanet_r50_fpn_1x_coco.py) at 800x1344, batch 16, bf16, channels_last, random weights and one
# synthetic batch (no data, no network): train and infer, eager, CUDA graph, compiled (time-capped), fused focal
# loss and box buckets, torchvision beside them, and a profile of the fastest train row. Every graphed or compiled
# row checks its first steps against the eager step (--check-steps) and is marked WRONG when they differ. Each row
# runs in its own process (its memory is gone before the next starts) under a time limit; after each row
# OUT/gpu_suite.json and OUT/gpu_suite.md are rewritten (experiments/benchmark/suite.py); OUT/gpu_suite.log is
# the console.
#   bash scripts/gpu_benchmark.sh OUT [--skip-compiled | --only-compiled | --rows eager,cuda_graph,...]
#        [--compile-cap=S] [--budget=S] [--dry-run]
# --rows takes row names (both modes) or MODE:NAME; --compile-cap bounds each compiled row (default 200 s; 0
# skips them); --budget the whole call (default 540 s, 240 s with --only-compiled; 0 runs nothing): no row starts
# after it and none runs past it. --dry-run: the same rows on the CPU at 128x128, batch 2, fp32, one timed call
# (plumbing only; compile cap 30 s). PYTHON picks the interpreter (default python3); ml_collections and optree,
# when missing, are installed from the wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/gpu_benchmark.sh OUT [--skip-compiled|--only-compiled|--rows A,B] [--compile-cap=S] \
[--budget=S] [--dry-run]"
out=${1:?$usage}
shift
dry=0 rows="" compiled_only=0 skip_compiled=0 cap=- budget=-  # -: not given
while (($#)); do
  case $1 in
    --dry-run) dry=1 ;;
    --only-compiled) compiled_only=1 ;;
    --skip-compiled) skip_compiled=1 ;;
    --rows=* | --compile-cap=* | --budget=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --rows) rows=,${2-},; shift ;;
    --compile-cap) cap=${2-}; shift ;;
    --budget) budget=${2-}; shift ;;
    *) echo "error: gpu_benchmark.sh: unknown argument '$1' ($usage)" >&2; exit 2 ;;
  esac
  shift
done
for value in "$cap" "$budget"; do
  if [[ $value != - && ! $value =~ ^[0-9]+$ ]]; then
    echo "error: gpu_benchmark.sh: --compile-cap and --budget take whole seconds >= 0, got '$value'" >&2; exit 2
  fi
done
python=${PYTHON:-python3}
if ! "$python" -c "import ml_collections, optree" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: gpu_benchmark.sh: $python lacks ml_collections or optree and .whl/ holds no wheels" >&2; exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/retina_fn_site .whl/*.whl
  export PYTHONPATH=/tmp/retina_fn_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out/rows"
rm -f "$out"/rows/*
exec > >(tee "$out/gpu_suite.log") 2>&1
tee_pid=$!

common=(--config configs/retinanet_r50_fpn_1x_coco.py --channels-last)
if ((dry)); then
  common+=(--canvas 128x128 --batch 2 --precision fp32 --device cpu --iters 1 --warmup 1)
  default_cap=30 default_budget=7200 row_cap=1800
else
  common+=(--canvas 800x1344 --batch 16 --precision bf16 --device cuda --iters 10 --warmup 3)
  default_cap=200 default_budget=$((compiled_only ? 240 : 540)) row_cap=150
fi
[[ $cap == - ]] && cap=$default_cap
[[ $budget == - ]] && budget=$default_budget
tv=1
"$python" -c "import torchvision" 2>/dev/null || tv=0
report() { "$python" experiments/benchmark/suite.py "$out" "$@"; }
row_pid=""
trap '[[ -n $row_pid ]] && kill -- "-$row_pid" 2>/dev/null; exit 143' TERM INT HUP  # the row's process group too
report start --dry-run="$dry" --budget="$budget" --compile-cap="$cap" -- "${common[@]}"
index=0

# row MODE NAME COMPILED [flags...]: runs one row when it is selected and time is left, then rewrites the report
row() {
  local mode=$1 name=$2 compiled=$3 id limit rc status note=""
  shift 3
  id=$(printf '%02d' $index)_${mode}_${name//+/-}
  index=$((index + 1))
  if [[ -n $rows && $rows != *",$name,"* && $rows != *",$mode:$name,"* ]]; then return; fi
  if ((compiled && skip_compiled || !compiled && compiled_only)); then return; fi
  limit=$((budget - SECONDS))
  if ((compiled && cap < limit)); then limit=$cap; elif ((!compiled && row_cap < limit)); then limit=$row_cap; fi
  if [[ $name == torchvision ]] && ((!tv)); then
    status=skipped note="torchvision is not installed"
  elif ((compiled && cap == 0)); then
    status=skipped note="--compile-cap=0"
  elif ((limit <= 0)); then
    status=skipped note="the budget of ${budget} s was spent"
  else
    echo "== [${SECONDS} s] $mode $name (limit ${limit} s): ${common[*]} --mode $mode $*"
    local started=$SECONDS
    # in the background, so that a TERM to this script reaches the trap at once; timeout leads its own group
    timeout -k 10 "$limit" "$python" -m experiments.benchmark "${common[@]}" --mode "$mode" "$@" \
      --json "$out/rows/$id.json" >"$out/rows/$id.log" 2>&1 &
    row_pid=$!
    wait "$row_pid"
    rc=$?
    row_pid=""
    cat "$out/rows/$id.log"
    case $rc in
      0) status=ok ;;
      124 | 137) status=timeout note="stopped at its limit of ${limit} s" ;;
      *) status=error note="exit status $rc: $(grep -v '^\s*$' "$out/rows/$id.log" | tail -n 1)" ;;
    esac
    note="${note:+$note; }$((SECONDS - started)) s"
  fi
  report row "$id" "$mode" "$name" "$compiled" "$status" "$note" -- "$@"
}

graph=--config.train.cuda_graph=True fused=--config.model.loss.fused_focal=True
buckets="--config.data.box_buckets=(8,16,32,64)" compile=--config.train.compile=True check=--check-steps=2
row train eager 0
row train cuda_graph 0 "$graph" "$check" --skip-flops
row train torchvision 0 --compare=torchvision --rounds=2 --skip-flops
row infer eager 0
row infer cuda_graph 0 "$graph" "$check" --skip-flops
row infer torchvision 0 --compare=torchvision --rounds=2 --skip-flops
row train fused_focal 0 "$fused" --skip-flops
row train fused_focal+cuda_graph 0 "$fused" "$graph" "$check" --skip-flops
row train box_buckets 0 "$buckets" --skip-flops
row train box_buckets+cuda_graph 0 "$buckets" "$graph" "$check" --skip-flops
row train fused_focal+box_buckets+cuda_graph 0 "$fused" "$buckets" "$graph" "$check" --skip-flops
if [[ -z $rows || $rows == *,profile,* ]] && ((!compiled_only)); then
  fastest=$(report fastest)
  if [[ $fastest != none ]]; then
    eval "flags=($fastest)"
    row train profile 0 "${flags[@]}" --iters=1 --warmup=2 --profile=3 --skip-flops
  fi
fi
row train compile 1 "$compile" "$check" --skip-flops
row train compile+cuda_graph 1 "$compile" "$graph" "$check" --skip-flops
row infer compile 1 "$compile" "$check" --skip-flops
echo "== [${SECONDS} s] wrote $out/gpu_suite.json, $out/gpu_suite.md and $out/gpu_suite.log"
cat "$out/gpu_suite.md"
exec >&- 2>&-
wait "$tee_pid"
