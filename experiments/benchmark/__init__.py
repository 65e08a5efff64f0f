"""Speed of the train step, inference and the data pipeline on one device, optionally beside torchvision.

train: make_train_step on one synthetic static batch; infer: make_eval_step with a zero classification bias (so
post-processing works at full load); data: the config's training loader (over synthetic JPEGs when its files are
absent). --variants and --compare torchvision alternate with ours in --rounds rounds."""

from __future__ import annotations

import json
import os

import torch

from retina_fn import class_count, schema
from retina_fn.engine import host_memory
from experiments.benchmark.measurement import load_average, machine_info, measure, measure_data, release, speedup
from experiments.benchmark.options import VARIANTS, Options, apply_options, check_options, parse_canvas, variant_config
from experiments.benchmark.subjects import ours_infer, ours_train, torchvision_available, tv_infer, tv_train
from retina_fn.engine.hooks import synchronize
from retina_fn.data.random_batch import config_batch
from retina_fn.parallel import backend

__all__ = ["Options", "format_table", "parse_canvas", "run", "write_json"]


def _device(name: str) -> torch.device:
    try:
        return backend.resolve_device(name).device
    except (ValueError, backend.DeviceUnavailable) as e:
        raise type(e)(f"--device {name!r}: {e}") from e


def _profile(call, steps: int, device: torch.device) -> dict:
    """torch.profiler's top 15 operations of `steps` calls, by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            call()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"steps": steps, "sort_by": key,
            "table": prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)}


def run(cfg, opts: Options) -> dict:
    """Runs one benchmark (option fields are written into cfg in place).

    Returns:
      A JSON-ready dict: the settings, 'machine', and 'data' (data mode) or 'ours' (measure's entry, 'check' under
      --check-steps), 'variants' ({name: entry + 'doc', 'overrides', 'speedup_of_ours'}), 'torchvision' (or None;
      then 'speedup_vs_torchvision'), 'profile'.

    Raises:
      ConfigError: bad options, model.num_classes 'auto' outside data mode, torchvision beside a non-R50 backbone;
        ValueError / backend.DeviceUnavailable: an unknown or absent --device.
    """
    check_options(opts, torchvision_available)
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    device = _device(opts.device)
    host_memory.keep_freed_memory(device)  # as the trainer: a CPU step reuses its freed buffers
    cfg = apply_options(cfg, opts)
    batch_size = int(cfg.data.images_per_device)
    result = {"config": cfg.name, "mode": opts.mode, "batch": batch_size, "canvas": list(cfg.data.landscape_canvas),
              "precision": schema.precision_name(cfg.train), "compile": bool(cfg.train.compile),
              "cuda_graph": bool(cfg.train.cuda_graph), "channels_last": bool(cfg.model.backbone.channels_last),
              "num_classes": cfg.model.num_classes, "iters": opts.iters, "warmup": opts.warmup,
              "rounds": opts.rounds, "machine": machine_info(device)}
    if opts.mode == "data":
        result["data"] = measure_data(cfg, opts, batch_size)
        result["machine"]["load_avg_end"] = load_average()
        return result

    num_classes = class_count.require_int(cfg, "experiments.benchmark (random batches)")
    ours, reference = (ours_train, tv_train) if opts.mode == "train" else (ours_infer, tv_infer)
    configs = [("ours", cfg)] + [(f"ours-{name}", variant_config(cfg, name)) for name in opts.variants]
    # each config's own batch: the same images and boxes, padded as its loader pads (box buckets)
    subjects = [ours(c, config_batch(c, num_classes, device, seed=opts.seed), device, opts.seed, name)
                for name, c in configs]
    if opts.compare == "torchvision":
        subjects.append(reference(cfg, config_batch(cfg, num_classes, device, seed=opts.seed), device, opts.seed))
    measured = measure(subjects, batch_size, opts, device)
    if opts.check_steps:
        for s in subjects:
            measured[s.name]["check"] = s.check(opts.check_steps) if s.check else None
    result["profile"] = _profile(subjects[0].call, opts.profile_steps, device) if opts.profile_steps else None
    subjects.clear()
    release(device)

    result["ours"] = measured["ours"]
    result["variants"] = {name: dict(measured[f"ours-{name}"], doc=VARIANTS[name][0], overrides=VARIANTS[name][1],
                                     speedup_of_ours=speedup(measured["ours"], measured[f"ours-{name}"]))
                          for name in opts.variants}
    result["torchvision"] = measured.get("torchvision")
    if result["torchvision"]:
        result["speedup_vs_torchvision"] = speedup(measured["ours"], measured["torchvision"])
        result["torchvision_version"] = __import__("torchvision").__version__
    result["machine"]["load_avg_end"] = load_average()
    return result


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def check_text(check: dict | None) -> str:
    if not check:
        return ""
    if check["ok"]:
        return f"matches eager ({check['steps']} steps)"
    worst = {name: check["differences"][name] for name in check["failed"]}
    return "WRONG: " + ", ".join(f"{name} {max(v) if isinstance(v, list) else v:.2e} > {check['tolerance'][name]:.0e}"
                                 for name, v in worst.items())


def format_table(result: dict) -> str:
    """`run`'s result (or its JSON) as a header line and one row per subject, speed-ups and the profile."""
    m = result["machine"]
    head = (f"{result['config']} | {result['mode']} | batch {result['batch']} | canvas {result['canvas'][0]}x"
            f"{result['canvas'][1]} | {result['precision']} | compile {result['compile']} | cuda_graph "
            f"{result['cuda_graph']} | channels_last {result['channels_last']} | {m['device']} "
            f"{m.get('gpu') or m['cpu']} | torch {m['torch']} | {m['threads']} threads | load "
            f"{m['load_avg_start']} -> {m.get('load_avg_end')}")
    if result["mode"] == "data":
        d = result["data"]
        return (head + f"\n  data loader: {d['images_per_s']:.1f} images/s ({d['batches']} batches, "
                f"{d['workers']} workers, first batch {d['first_batch_s']:.2f} s; {d['source']})")
    lines = [head, f"  {'subject':<22} {'img/s':>8} {'median s':>9} {'p10 s':>8} {'p90 s':>8} {'first s':>8} "
                   f"{'peak MB':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}"]
    subjects = [("ours", result["ours"])] + [(f"ours-{n}", r) for n, r in result["variants"].items()]
    subjects += [("torchvision", result["torchvision"])] if result["torchvision"] else []
    for name, r in subjects:
        s = r["step_s"]
        lines.append(f"  {name:<22} {r['images_per_s']:8.3f} {s['median']:9.4f} {s['p10']:8.4f} {s['p90']:8.4f} "
                     f"{_fmt(r['first_call_s'], '8.2f')} {r['peak_memory_mb']:8.0f} "
                     f"{_fmt(r['flops_per_image'], '10.1f', 1e-9)} {_fmt(r['achieved_tflops'], '8.3f')} "
                     f"{_fmt(r['mfu'], '6.1%')} {check_text(r.get('check'))}")
    for name, r in result["variants"].items():
        sp = r["speedup_of_ours"]
        lines.append(f"  ours vs ours-{name} ({r['doc']}): {sp['from_medians']:.3f}x from medians, "
                     f"{sp['paired']:.3f}x paired by round")
    if result["torchvision"]:
        sp = result["speedup_vs_torchvision"]
        lines.append(f"  ours vs torchvision: {sp['from_medians']:.3f}x from medians, {sp['paired']:.3f}x paired")
    if result.get("profile"):
        lines += [f"  profile of {result['profile']['steps']} calls of ours, by {result['profile']['sort_by']}:",
                  result["profile"]["table"]]
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    """Writes a result as sorted, indented JSON (other values as str()), atomically, creating the directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)
