"""A suite's report: the machine and card it ran on, each row's speed-ups and MFU, and the markdown table
written beside the JSON (gpu_suite.json, gpu_suite.md).

    add_ratios(rows, peak_tflops)       # x_eager, x_torchvision, achieved_tflops, mfu of each ok row
    write_outputs(result, out_dir)      # gpu_suite.json and gpu_suite.md
"""

from __future__ import annotations

import os

import torch

from experiments.benchmark.measurement import machine_info
from experiments.benchmark.report import write_json
from experiments.benchmark.torchvision_ref import torchvision_available
from retina_fn.train import build

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, by card name (for MFU)


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


def peak_tflops(info: dict) -> float | None:
    """The card's dense bf16 TFLOP/s from PEAK_BF16_TFLOPS by its name in `info` (card_info), None if unknown."""
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

