"""A benchmark result as a terminal table and as a JSON file."""

from __future__ import annotations

import json
import os


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
