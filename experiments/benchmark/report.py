"""A benchmark result as a terminal table and as a JSON file."""

from __future__ import annotations

import json
import os
from typing import Callable


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(result: dict) -> str:
    """A few readable lines for the terminal.

    Args:
      result: what `experiments.benchmark.run` returned (or its JSON, loaded again).

    Returns:
      A header line (config, mode, batch, canvas, precision, machine, load) and, for train/infer, one row
      per model (images/s, median/p10/p90 seconds, first call, peak MB, GFLOP per image, TFLOP/s, MFU),
      the variants' and torchvision's speed-ups and inference's post-processing share; for data, the
      loader's images/s.
    """
    m = result["machine"]
    head = (f"{result['config']} | {result['mode']} | batch {result['batch']} | canvas "
            f"{result['canvas'][0]}x{result['canvas'][1]} | {result['precision']} | compile {result['compile']} | "
            f"channels_last {result['channels_last']} | {m['device']} {m.get('cpu', '')} | torch {m['torch']} | "
            f"{m['threads']} threads | load {m.get('load_avg_start')} -> {m.get('load_avg_end')}")
    if result["mode"] == "data":
        d = result["data"]
        return (head + f"\n  data loader: {d['images_per_s']:.1f} images/s ({d['batches']} batches, "
                f"{d['workers']} workers, first batch {d['first_batch_s']:.2f} s; {d['source']})")
    cols = f"  {'model':<12} {'img/s':>8} {'median s':>9} {'p10 s':>8} {'p90 s':>8} {'first s':>8} " \
           f"{'peak MB':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}"
    lines = [head, cols]
    rows = [("ours", result["ours"])] + [(f"-{n}", r) for n, r in result.get("variants", {}).items()]
    if result.get("torchvision"):
        rows.append(("torchvision", result["torchvision"]))
    for name, r in rows:
        s = r["step_s"]
        lines.append(f"  {name:<12} {r['images_per_s']:8.3f} {s['median']:9.3f} {s['p10']:8.3f} {s['p90']:8.3f} "
                     f"{_fmt(r['first_call_s'], '8.2f')} {r['peak_memory_mb']:8.0f} "
                     f"{_fmt(r['flops_per_image'], '10.1f', 1e-9)} {_fmt(r['achieved_tflops'], '8.4f')} "
                     f"{_fmt(r['mfu'], '6.1%')}")
    for name, r in result.get("variants", {}).items():
        sp = r["speedup_of_ours"]
        lines.append(f"  ours vs ours-{name} ({r['doc']}): {sp['from_medians']:.3f}x from medians, "
                     f"{sp['paired']:.3f}x paired by round")
    if "ratio_images_per_s" in result:
        sp = result["speedup_vs_torchvision"]
        lines.append(f"  ours / torchvision images/s: {sp['from_medians']:.3f}x from medians, "
                     f"{sp['paired']:.3f}x paired by round")
    b = result["ours"].get("breakdown")
    if b:
        lines.append(f"  ours: forward {b['forward_s']:.3f} s, post-processing {b['detect_s']:.3f} s "
                     f"({b['detect_share']:.1%} of inference)")
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    """Writes a result as indented JSON with sorted keys (anything else JSON lacks as its str()).

    Args:
      path: the file; its directory is created when missing.
      result: the dict to write.

    Returns:
      None.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)


def run_tool(measure: Callable[[], dict], format_result: Callable[[dict], str], threads, out) -> None:
    """The command line of a benchmark tool: parse the flags, set the thread count, measure, print the
    table, write the JSON when asked.

    Args:
      measure: runs the measurement from the parsed flags and returns its result.
      format_result: result -> the printed table.
      threads: the tool's --threads flag holder (None or 0: torch's choice).
      out: the tool's --json flag holder (None: print only).

    Returns:
      None (absl's app.run exits when done).
    """
    import torch
    from absl import app, flags

    def run(argv):
        del argv
        if threads.value:
            torch.set_num_threads(int(threads.value))
        result = measure()
        print(format_result(result))
        if out.value:
            write_json(out.value, result)
            print(f"wrote {out.value}")

    flags.mark_flags_as_required(["config"])
    app.run(run)
