"""Prepared benchmark suites: one command that measures everything a short accelerator session is for.

    python -m experiments.benchmark --suite gpu --out DIR              # about 8 minutes on one H100 / H200
    python -m experiments.benchmark --suite gpu --out DIR --dry-run    # a CPU minute: the same plumbing

The 'gpu' suite: configs/retinanet_r50_fpn_1x_coco.py at 800 x 1344, batch 16, bf16 autocast, channels_last,
random weights and one synthetic static batch (retina_fn.data.random_batch; nothing is read or downloaded).
Rows, each timed alone (warm-up calls, then timed calls ending in a device synchronisation):

  train  eager | cuda_graph (train.cuda_graph) | fused_focal (model.loss.fused_focal) and with cuda_graph |
         box_buckets (data.box_buckets) and with cuda_graph | fused_focal + box_buckets + cuda_graph |
         compile (train.compile) | compile + cuda_graph | torchvision's RetinaNet
  infer  eager | cuda_graph (the eval forward captured) | compile | torchvision's RetinaNet

then a torch.profiler table of the top kernels of the fastest train row. Each row records its error instead of
stopping the suite; a row whose config field does not exist (a flag not implemented yet) is skipped with a
note. The compiled rows run in a worker process (experiments.benchmark.worker) under a time cap, after every
other row, within what is left of the suite's time budget: a compile that does not finish is reported as
such. With data.box_buckets the batch's ground truth is padded to the smallest bucket holding its largest
box count instead of data.max_boxes (what the loader does with the field). FLOPs are counted once per
mode, on the eager row (FlopCounterMode: convolutions and matrix products, the same network in every row).

Writes DIR/gpu_suite.json (everything: the machine, card, torch, CUDA and cuDNN versions, every row with its
timings, notes and errors, the profile) and DIR/gpu_suite.md (the table).

This module runs a plan; the rows, plans and the synthetic batch are experiments.benchmark.suite_plan's, the
ratios and tables experiments.benchmark.suite_report's, and experiments.benchmark.worker runs the compiled rows.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback

import torch

from configs import common
from experiments.benchmark.measurement import measure
from experiments.benchmark.options import Options
from experiments.benchmark.ours import ours_infer, ours_train
from experiments.benchmark.suite_plan import Plan, Row, load_config, missing_fields
from experiments.benchmark.suite_report import add_ratios, card_info, peak_tflops, write_outputs
from experiments.benchmark.torchvision_ref import torchvision_available, tv_infer, tv_train
from retina_fn.engine.hooks import synchronize
from retina_fn.data.random_batch import config_batch


def _subject(cfg, row: Row, batch: dict, device: torch.device, opts: Options):
    if row.name == "torchvision":
        return (tv_train if row.mode == "train" else tv_infer)(cfg, batch, opts, device)
    if row.mode == "train":
        return ours_train(cfg, batch, device, name=row.name)
    return ours_infer(cfg, batch, device, dense_scores=True, name=row.name)


def release(device: torch.device) -> None:
    """Frees what finished rows left behind (their graphs' memory pools included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _LogRecorder(logging.Handler):
    """Keeps the library's log lines of one row (a CUDA graph recorded, a fallback to eager and why)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def run_row(cfg, row: Row, plan: Plan, device: torch.device, count_flops: bool = False) -> dict:
    """Times one row.

    Args:
      cfg: the suite's config (copied, not changed).
      row: what to run.
      plan: iters, warmup.
      device: where.
      count_flops: also count one eager call's FLOPs.

    Returns:
      {'status': 'ok', 'result': measure's entry (images_per_s, step_s, first_call_s, peak_memory_mb,
      flops_per_image, ...)}; {'status': 'skipped', 'note'} when the row cannot run here; {'status':
      'error', 'note': the exception, 'traceback': its last lines} when it failed; ok and error with 'log',
      the retina_fn loggers' lines while it ran (INFO and up).
    """
    missing = missing_fields(cfg, row.overrides)
    if missing:
        return {"status": "skipped", "note": f"the config has no {', '.join(missing)} (not implemented yet)"}
    if row.name == "torchvision" and not torchvision_available():
        return {"status": "skipped", "note": "torchvision is not installed here"}
    recorder, library_log = _LogRecorder(), logging.getLogger("retina_fn")
    library_log.addHandler(recorder)
    try:
        row_cfg = common.override(cfg.copy_and_resolve_references(), **row.overrides)
        opts = Options(mode=row.mode, iters=plan.iters, warmup=plan.warmup, rounds=1, count_flops=count_flops)
        batch = config_batch(row_cfg, int(row_cfg.model.num_classes), device)
        subject = _subject(row_cfg, row, batch, device, opts)
        result = measure([subject], plan.batch, opts, device)[row.name]
        return {"status": "ok", "result": result, "log": recorder.lines}
    except Exception as e:  # noqa: BLE001 - a suite records a failed row and goes on
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:2000], "log": recorder.lines,
                "traceback": traceback.format_exc()[-4000:]}
    finally:
        library_log.removeHandler(recorder)
        release(device)


def profile_row(cfg, row: Row, plan: Plan, device: torch.device, steps: int) -> dict:
    """A torch.profiler table of one row's top kernels (by device time on an accelerator, CPU time otherwise).

    Returns:
      {'row', 'mode', 'steps', 'table' (text)} or {'row', 'error'}.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        row_cfg = common.override(cfg.copy_and_resolve_references(), **row.overrides)
        opts = Options(mode=row.mode, iters=1, warmup=0, count_flops=False)
        subject = _subject(row_cfg, row, config_batch(row_cfg, int(row_cfg.model.num_classes), device), device, opts)
        for _ in range(2):  # compile / capture / warm-up outside the profile
            subject.call()
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                subject.call()
            synchronize(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)
        return {"row": f"{row.mode} {row.name}", "steps": steps, "sort_by": key, "table": table}
    except Exception as e:  # noqa: BLE001 - the profile is the last extra: record and go on
        return {"row": f"{row.mode} {row.name}", "error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        release(device)


def run_worker_rows(rows: list[Row], plan: Plan, out_dir: str, timeout_s: float) -> dict[str, dict]:
    """Runs rows in a worker process (experiments.benchmark.worker) under a time cap.

    The worker rewrites its results file after every row, so the rows it finished survive a kill; the row it
    was in when the cap struck is reported as timed out, the ones after it as skipped.

    Args:
      rows: the rows (compiled ones).
      plan: the suite's plan (passed to the worker).
      out_dir: where the worker's spec and results files go.
      timeout_s: the cap.

    Returns:
      {'<mode> <name>': run_row's dict, plus 'seconds'}.
    """
    spec_path = os.path.join(out_dir, "worker_spec.json")
    result_path = os.path.join(out_dir, "worker_rows.json")
    with open(spec_path, "w") as f:
        json.dump({"plan": {**plan._asdict(), "rows": [r._asdict() for r in rows]}, "out": result_path}, f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "experiments.benchmark.worker", spec_path]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=root, start_new_session=True)  # its own group: compile workers too
    timed_out = False
    try:
        code = process.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        timed_out, code = True, None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        os.remove(spec_path)
    elapsed = time.perf_counter() - start
    done = {}
    if os.path.exists(result_path):
        with open(result_path) as f:
            done = json.load(f)
        os.remove(result_path)
    stopped = (f"the compile time cap ({timeout_s:.0f} s) ran out" if timed_out
               else f"the worker process exited with code {code}")
    results = {}
    for row in rows:
        key = f"{row.mode} {row.name}"
        if key in done and done[key].get("status") != "running":
            results[key] = done[key]
        elif key in done:  # the row it was in when it stopped
            results[key] = {"status": "timeout" if timed_out else "error",
                            "note": f"{stopped} after {elapsed:.0f} s, during this row",
                            "seconds": time.time() - done[key]["started"]}
        else:
            results[key] = {"status": "skipped", "note": f"{stopped} before this row"}
    return results



def run_suite(plan: Plan, out_dir: str, dry_run: bool = False) -> dict:
    """Runs a plan's rows, then the profile, then the worker rows; writes gpu_suite.json and gpu_suite.md after
    each row.

    Args:
      plan: what to run.
      out_dir: the folder for the two files (created).
      dry_run: recorded in the outputs (a CPU check of the plumbing).

    Returns:
      The JSON-ready result: 'suite', 'dry_run', 'plan', 'machine' (card_info), 'peak_tflops', 'rows' (mode,
      name, doc, overrides, status, note, log, result, x_eager, x_torchvision, achieved_tflops, mfu),
      'profile', 'elapsed_s'.
    """
    from retina_fn.parallel import backend

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    device = backend.resolve_device(plan.device).device
    cfg = load_config(plan)
    info = card_info(device)
    peak = peak_tflops(info)
    result = {"suite": "gpu", "dry_run": dry_run, "plan": {**plan._asdict(), "rows": None}, "machine": info,
              "peak_tflops": peak, "rows": [], "profile": None, "elapsed_s": 0.0}
    rows = result["rows"]

    def record(row: Row, outcome: dict) -> None:
        rows.append({"mode": row.mode, "name": row.name, "doc": row.doc, "overrides": dict(row.overrides),
                     **outcome})
        add_ratios(rows, peak)
        result["elapsed_s"] = time.perf_counter() - start
        info["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        write_outputs(result, out_dir)
        status = outcome["status"] + (f" ({outcome['note'][:160]})" if outcome.get("note") else "")
        speed = f"{outcome['result']['images_per_s']:.2f} img/s, " if outcome["status"] == "ok" else ""
        print(f"[{result['elapsed_s']:6.0f} s] {row.mode} {row.name}: {speed}{status}", flush=True)

    counted = set()
    for row in plan.rows:
        if row.worker:
            continue
        if time.perf_counter() - start > plan.budget_s:
            record(row, {"status": "skipped", "note": f"the suite's time budget ({plan.budget_s:.0f} s) ran out"})
            continue
        count = row.name == "eager" and row.mode not in counted
        if count:
            counted.add(row.mode)
        record(row, run_row(cfg, row, plan, device, count_flops=count))

    train_ok = [r for r in rows if r["mode"] == "train" and r["status"] == "ok" and r["name"] != "torchvision"]
    if plan.profile_steps and train_ok:
        best = max(train_ok, key=lambda r: r["result"]["images_per_s"])
        result["profile"] = profile_row(cfg, Row("train", best["name"], best["doc"], best["overrides"]), plan,
                                        device, plan.profile_steps)

    worker_rows = [r for r in plan.rows if r.worker]
    left = plan.budget_s - (time.perf_counter() - start)
    if worker_rows and left < 30:
        for row in worker_rows:
            record(row, {"status": "skipped", "note": "no time left in the suite's budget for compiling"})
    elif worker_rows:
        outcomes = run_worker_rows(worker_rows, plan, out_dir, min(plan.compile_cap_s, left))
        for row in worker_rows:
            record(row, outcomes[f"{row.mode} {row.name}"])
    result["elapsed_s"] = time.perf_counter() - start
    write_outputs(result, out_dir)
    return result

