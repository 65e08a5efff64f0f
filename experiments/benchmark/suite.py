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
from typing import Any, Mapping, NamedTuple

import torch

from configs import common
from experiments.benchmark.measurement import machine_info, measure
from experiments.benchmark.options import Options
from experiments.benchmark.ours import ours_infer, ours_train
from experiments.benchmark.report import write_json
from experiments.benchmark.torchvision_ref import torchvision_available, tv_infer, tv_train
from experiments.train_hooks import synchronize
from retina_fn.data import batching
from retina_fn.data.random_batch import random_batch
from retina_fn.train import build

SUITES = ("gpu",)
BOX_BUCKETS = (8, 16, 32, 64)  # the box_buckets rows' data.box_buckets (data.max_boxes is always the last)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, by card name (for MFU)


class Row(NamedTuple):
    """One measurement of a suite.

    Attributes:
      mode: 'train' | 'infer'.
      name: its name in the table ('eager', 'cuda_graph', 'torchvision', ...).
      doc: what it changes.
      overrides: dotted config path -> value, applied to a copy of the suite's config.
      worker: run it in the worker process under the compile time cap.
    """

    mode: str
    name: str
    doc: str
    overrides: Mapping[str, Any] = {}
    worker: bool = False


class Plan(NamedTuple):
    """What a suite runs and how.

    Attributes:
      config: the config module under configs/ (e.g. 'retinanet_r50_fpn_1x_coco').
      canvas: (H, W); batch: images per step; precision: 'fp32' | 'fp16' | 'bf16'; channels_last: the backbone's.
      iters, warmup: timed and untimed calls per row.
      device: 'cuda' | 'cpu' | 'auto' (retina_fn.parallel.backend's names).
      budget_s: the whole suite's time budget in seconds; rows that would start later are skipped.
      compile_cap_s: the longest the worker may take (less when less of the budget is left).
      rows: the rows, in order; the worker's run after all others.
      profile_steps: profiled calls of the fastest train row (0: no profile).
    """

    config: str
    canvas: tuple[int, int]
    batch: int
    precision: str
    channels_last: bool
    iters: int
    warmup: int
    device: str
    budget_s: float
    compile_cap_s: float
    rows: tuple[Row, ...]
    profile_steps: int = 3


def gpu_rows() -> tuple[Row, ...]:
    """The 'gpu' suite's rows (see the module docstring)."""
    graph, fused = {"train.cuda_graph": True}, {"model.loss.fused_focal": True}
    buckets = {"data.box_buckets": BOX_BUCKETS}
    return (
        Row("train", "eager", "the pure step, eager"),
        Row("train", "cuda_graph", "the whole step as one CUDA graph", graph),
        Row("train", "torchvision", "torchvision's RetinaNet R50-FPN: model(images, targets), backward, SGD"),
        Row("infer", "eager", "forward + post-processing, eager"),
        Row("infer", "cuda_graph", "the forward as a CUDA graph, post-processing eager", graph),
        Row("infer", "torchvision", "torchvision's RetinaNet R50-FPN, model.eval()"),
        Row("train", "fused_focal", "fused focal loss (one pass, integer labels)", fused),
        Row("train", "fused_focal+cuda_graph", "fused focal loss, CUDA graph", {**fused, **graph}),
        Row("train", "box_buckets", f"ground truth padded to a bucket of {BOX_BUCKETS}", buckets),
        Row("train", "box_buckets+cuda_graph", "box buckets, CUDA graph", {**buckets, **graph}),
        Row("train", "fused_focal+box_buckets+cuda_graph", "all three", {**fused, **buckets, **graph}),
        # compile+cuda_graph first: the likeliest fastest row gets the time cap's first minutes; 'compile' then
        # reuses inductor's caches of the same graph
        Row("train", "compile+cuda_graph", "the compiled step (train.compile_scope 'auto') captured as a CUDA graph",
            {"train.compile": True, **graph}, worker=True),
        Row("train", "compile", "torch.compile (train.compile_scope 'auto')", {"train.compile": True}, worker=True),
        Row("infer", "compile", "torch.compile of the eval step", {"train.compile": True}, worker=True),
    )


def gpu_plan(dry_run: bool = False) -> Plan:
    """The 'gpu' suite: R50-FPN 1x, 800 x 1344, batch 16, bf16, about 8 minutes; dry_run: the same rows on the
    CPU with configs/smoke.py at 64 x 64, batch 2, one call each (about a minute on two cores, most of it the
    compile time cap: it checks the plumbing, its figures mean nothing)."""
    if dry_run:
        return Plan("smoke", (64, 64), 2, "bf16", True, iters=1, warmup=1, device="cpu", budget_s=600.0,
                    compile_cap_s=60.0, rows=gpu_rows(), profile_steps=1)
    return Plan("retinanet_r50_fpn_1x_coco", (800, 1344), 16, "bf16", True, iters=10, warmup=3, device="cuda",
                budget_s=480.0, compile_cap_s=300.0, rows=gpu_rows())


def load_config(plan: Plan):
    """The plan's config with its canvas, batch, precision and channels_last written in."""
    module = __import__(f"configs.{plan.config}", fromlist=["get_config"])
    cfg = module.get_config()
    h, w = plan.canvas
    return common.override(cfg, **{"data.images_per_device": plan.batch, "data.eval_images_per_device": plan.batch,
                                   "data.landscape_canvas": (h, w), "data.portrait_canvas": (w, h),
                                   "train.precision": plan.precision, "train.opt_level": None,
                                   "model.backbone.channels_last": plan.channels_last})


def missing_fields(cfg, overrides: Mapping[str, Any]) -> list[str]:
    """The dotted paths of `overrides` that the config does not have."""
    missing = []
    for dotted in overrides:
        node = cfg
        for key in dotted.split("."):
            if not hasattr(node, "keys") or key not in node.keys():
                missing.append(dotted)
                break
            node = node[key]
    return missing


def suite_batch(cfg, device: torch.device, seed: int = 0) -> dict:
    """The synthetic batch of a row: 3 to 6 random boxes per image (drawn from the seed alone, so every row
    trains on the same counts), padded as the loader pads (retina_fn.data.batching): to data.max_boxes or,
    with data.box_buckets, to the smallest bucket holding the largest count."""
    batch_size = int(cfg.data.images_per_device)
    counts = [int(n) for n in torch.randint(3, 7, (batch_size,), generator=torch.Generator().manual_seed(seed))]
    sizes = batching.bucket_sizes(tuple(cfg.data.get("box_buckets", ())), int(cfg.data.max_boxes))
    rows = batching.padded_count(max(counts), sizes)
    return random_batch(counts, canvas=tuple(cfg.data.landscape_canvas), max_boxes=rows,
                        max_ignore_boxes=int(cfg.data.max_ignore_boxes), num_classes=int(cfg.model.num_classes),
                        seed=seed, device=device)


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
        batch = suite_batch(row_cfg, device)
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
        subject = _subject(row_cfg, row, suite_batch(row_cfg, device), device, opts)
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


def card_info(device: torch.device) -> dict:
    """What the GPU suite's header shows: machine_info plus the card, CUDA, cuDNN and torchvision versions and
    the compile scope train.compile resolves to here."""
    info = machine_info(device)
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if torchvision_available():
        info["torchvision"] = __import__("torchvision").__version__
    else:
        info["torchvision"] = None
    info["compile_scope_auto"] = build.resolve_compile_scope("auto", device.type)
    return info


def _peak_tflops(info: dict) -> float | None:
    gpu = info.get("gpu") or ""
    return next((v for name, v in PEAK_BF16_TFLOPS.items() if name in gpu), None)


def add_ratios(rows: list[dict], peak_tflops: float | None) -> None:
    """Fills each ok row's 'x_eager', 'x_torchvision' (images/s ratios to the same mode's rows), and
    'mfu' / 'achieved_tflops' from its mode's counted FLOPs (in place)."""
    def images_per_s(mode, name):
        return next((r["result"]["images_per_s"] for r in rows
                     if r["mode"] == mode and r["name"] == name and r["status"] == "ok"), None)

    def flops(mode):
        return next((r["result"]["flops_per_image"] for r in rows if r["mode"] == mode and r["status"] == "ok"
                     and r["result"].get("flops_per_image")), None)

    for r in rows:
        if r["status"] != "ok":
            continue
        res = r["result"]
        eager, tv = images_per_s(r["mode"], "eager"), images_per_s(r["mode"], "torchvision")
        r["x_eager"] = res["images_per_s"] / eager if eager else None
        r["x_torchvision"] = res["images_per_s"] / tv if tv else None
        per_image = flops(r["mode"])
        r["achieved_tflops"] = per_image * res["images_per_s"] / 1e12 if per_image else None
        r["mfu"] = r["achieved_tflops"] / peak_tflops if r["achieved_tflops"] and peak_tflops else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _status(row: dict) -> str:
    """A row's status for the table: ok / skipped / error / timeout, its note and its logged warnings."""
    parts = [row["status"]] + ([row["note"]] if row.get("note") else [])
    parts += [line for line in row.get("log", ()) if line.startswith("WARNING")]
    return "; ".join(parts).replace("|", "/").replace("\n", " ")[:400]


def markdown(result: dict) -> str:
    """The suite's table (and profile) as markdown."""
    m, p = result["machine"], result["plan"]
    lines = [
        f"# {result['suite']} suite{' (dry run: plumbing only, figures meaningless)' if result['dry_run'] else ''}",
        "",
        f"{p['config']} | canvas {p['canvas'][0]}x{p['canvas'][1]} | batch {p['batch']} | {p['precision']} | "
        f"channels_last {p['channels_last']} | {p['iters']} timed calls after {p['warmup']} warm-up",
        "",
        f"{m.get('gpu') or m.get('cpu')} | torch {m['torch']} | CUDA {m['cuda']} | cuDNN {m['cudnn']} | "
        f"torchvision {m['torchvision'] or 'not installed'} | train.compile_scope 'auto' here: "
        f"{m['compile_scope_auto']} | {result['elapsed_s']:.0f} s in all",
        "",
        "| mode | row | img/s | s/step median (p10-p90) | first call s | peak GB | x eager | x torchvision | "
        "TFLOP/s (MFU) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["status"] == "ok":
            res, s = r["result"], r["result"]["step_s"]
            mfu = f" ({r['mfu']:.1%})" if r.get("mfu") else ""
            lines.append(
                f"| {r['mode']} | {r['name']} | {res['images_per_s']:.1f} | {s['median']:.4f} ({s['p10']:.4f}-"
                f"{s['p90']:.4f}) | {_fmt(res['first_call_s'], '.1f')} | {res['peak_memory_mb'] / 1024:.1f} | "
                f"{_fmt(r.get('x_eager'), '.2f')} | {_fmt(r.get('x_torchvision'), '.2f')} | "
                f"{_fmt(r.get('achieved_tflops'), '.1f')}{mfu} | {_status(r)} |")
        else:
            lines.append(f"| {r['mode']} | {r['name']} | - | - | - | - | - | - | - | {_status(r)} |")
    profile = result.get("profile")
    if profile:
        lines += ["", f"## Top kernels of the fastest train row ({profile['row']}, {profile.get('steps')} calls, "
                      f"{profile.get('sort_by')})", ""]
        lines += ["```", profile["table"], "```"] if "table" in profile else [f"profile failed: {profile['error']}"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str) -> None:
    """Writes gpu_suite.json and gpu_suite.md (after every row, so a killed suite leaves what it measured)."""
    write_json(os.path.join(out_dir, "gpu_suite.json"), result)
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write(markdown(result))


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
    peak = _peak_tflops(info)
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
