"""The GPU suite's report (scripts/gpu_benchmark.sh): OUT/rows/ gathered into OUT/gpu_suite.json and .md after
every row. The standard library only: the script runs it as a file, without torch:

    suite.py OUT start --dry-run=0 --budget=540 --compile-cap=200 -- BENCHMARK_FLAGS   # the plan, an empty table
    suite.py OUT row ID MODE NAME COMPILED STATUS NOTE -- ROW_FLAGS                     # one row's outcome
    suite.py OUT fastest      # the flags of the fastest train row that ran (for its profile), shell-quoted; none

Statuses: ok, WRONG (eager check failed), timeout, error, skipped. x eager / x torchvision: images/s ratios to the
mode's rows; TFLOP/s and MFU use the FLOPs counted on the mode's eager row."""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 / fp16, by card name


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _write(path: str, text: str) -> None:  # atomic
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def row_entry(record: dict, result: dict | None) -> dict:
    """The script's record of a row with, when it ran, its subject's benchmark entry as 'result' and more."""
    row = dict(record)
    if record["status"] != "ok":
        return row
    if result is None:
        return dict(row, status="error", note="no result file")
    subject = result["torchvision"] if record["name"] == "torchvision" else result["ours"]
    row.update(result=subject, flops_per_image=result["ours"]["flops_per_image"], check=subject.get("check"),
               profile=result.get("profile"), machine=result["machine"],
               torchvision_version=result.get("torchvision_version"))
    if result.get("speedup_vs_torchvision"):
        row["paired_vs_torchvision"] = result["speedup_vs_torchvision"]["paired"]
    if row["check"] and not row["check"]["ok"]:
        row["status"] = "WRONG"
    return row


def add_ratios(rows: list[dict], peak_tflops: float | None) -> None:
    def find(mode, name):
        return next((r for r in rows if r["mode"] == mode and r["name"] == name and "result" in r), None)

    for r in rows:
        if "result" not in r:
            continue
        ips = r["result"]["images_per_s"]
        eager, tv = find(r["mode"], "eager"), find(r["mode"], "torchvision")
        r["x_eager"] = ips / eager["result"]["images_per_s"] if eager else None
        r["x_torchvision"] = ips / tv["result"]["images_per_s"] if tv else None
        flops = eager["flops_per_image"] if eager else None
        r["achieved_tflops"] = flops * ips / 1e12 if flops else None
        r["mfu"] = r["achieved_tflops"] / peak_tflops if r["achieved_tflops"] and peak_tflops else None


def gather(out_dir: str) -> dict:
    plan = _read(os.path.join(out_dir, "rows", "plan.json"))
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "rows", "*.row.json"))):
        record = _read(path)
        result_path = os.path.join(out_dir, "rows", record["id"] + ".json")
        rows.append(row_entry(record, _read(result_path) if os.path.exists(result_path) else None))
    machine = next((r["machine"] for r in rows if "machine" in r), {})
    versions = [r.get("torchvision_version") or r["note"] for r in rows if r["name"] == "torchvision"]
    machine["torchvision"] = versions[0].replace("torchvision is ", "") if versions else None
    precision = plan["flags"][plan["flags"].index("--precision") + 1]
    peak = next((v for card, v in PEAK_TFLOPS.items() if card in (machine.get("gpu") or "")
                 and precision in ("bf16", "fp16")), None)
    profile = next((r for r in rows if r["name"] == "profile"), None)
    rows = [r for r in rows if r["name"] != "profile"]
    add_ratios(rows, peak)
    return {"suite": "gpu", "plan": plan, "machine": machine, "peak_tflops": peak, "rows": rows, "profile": profile}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _check(row: dict) -> str:
    c = row.get("check")
    if not c:
        return "-"
    worst = max((max(v) if isinstance(v, list) else v) / c["tolerance"][k] for k, v in c["differences"].items())
    verdict = "WRONG: " + ", ".join(c["failed"]) if c["failed"] else "matches"
    return f"{verdict} ({c['steps']} steps, largest difference {worst:.2g} of its tolerance)"


def markdown(result: dict) -> str:
    p, m = result["plan"], result["machine"]
    lines = [f"# GPU suite{' (dry run: plumbing only, figures meaningless)' if p['dry_run'] else ''}", "",
             f"`{' '.join(p['flags'])}`; budget {p['budget']} s, compile cap {p['compile_cap']} s", "",
             f"{m.get('gpu') or m.get('cpu', '?')} | torch {m.get('torch', '?')} | CUDA {m.get('cuda')} | cuDNN "
             f"{m.get('cudnn')} | torchvision {m.get('torchvision')}", "",
             "| mode | row | img/s | s/step median (p10-p90) | first call s | peak GB | x eager | x torchvision | "
             "TFLOP/s (MFU) | eager check | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        status = "; ".join(x for x in (r["status"], r.get("note")) if x).replace("|", "/").replace("\n", " ")
        if "paired_vs_torchvision" in r:
            status += f"; ours eager {r['paired_vs_torchvision']:.2f}x torchvision, paired in this process"
        if "result" not in r:
            lines.append(f"| {r['mode']} | {r['name']} | - | - | - | - | - | - | - | - | {status[:300]} |")
            continue
        res, s = r["result"], r["result"]["step_s"]
        mfu = f" ({r['mfu']:.1%})" if r.get("mfu") else ""
        lines.append(f"| {r['mode']} | {r['name']} | {res['images_per_s']:.1f} | {s['median']:.4f} ({s['p10']:.4f}-"
                     f"{s['p90']:.4f}) | {_fmt(res['first_call_s'], '.1f')} | {res['peak_memory_mb'] / 1024:.1f} | "
                     f"{_fmt(r.get('x_eager'), '.2f')} | {_fmt(r.get('x_torchvision'), '.2f')} | "
                     f"{_fmt(r.get('achieved_tflops'), '.1f')}{mfu} | {_check(r)} | {status[:300]} |")
    prof = result["profile"]
    if prof:
        lines += ["", f"## Top operations of the fastest train row (`{' '.join(prof['flags'])}`)", ""]
        table = (prof.get("profile") or {}).get("table")
        lines += ["```", table, "```"] if table else [f"profile: {prof['status']}; {prof.get('note')}"]
    return "\n".join(lines) + "\n"


def render(out_dir: str) -> dict:
    result = gather(out_dir)
    _write(os.path.join(out_dir, "gpu_suite.json"), json.dumps(result, indent=2, sort_keys=True))
    _write(os.path.join(out_dir, "gpu_suite.md"), markdown(result))
    return result


def fastest_train_flags(out_dir: str) -> list[str] | None:
    """The flags of the fastest ok train row but torchvision, less --check-steps and --skip-flops; None if none."""
    rows = [r for r in gather(out_dir)["rows"] if r["mode"] == "train" and r["status"] == "ok"
            and r["name"] != "torchvision"]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["result"]["images_per_s"])
    return [f for f in best["flags"] if not f.startswith(("--check-steps", "--skip-flops"))]


def main(argv: list[str]) -> int:
    out_dir, command, args = argv[0], argv[1], argv[2:] + ["--"]
    head, flags = args[:args.index("--")], args[args.index("--") + 1:-1]
    if command == "start":
        opts = dict(a.lstrip("-").split("=", 1) for a in head)
        plan = {"dry_run": opts["dry-run"] == "1", "budget": int(opts["budget"]),
                "compile_cap": int(opts["compile-cap"]), "flags": flags}
        _write(os.path.join(out_dir, "rows", "plan.json"), json.dumps(plan))
    elif command == "row":
        record = dict(zip(("id", "mode", "name", "compiled", "status", "note"), head), flags=flags)
        record["compiled"] = record["compiled"] == "1"
        _write(os.path.join(out_dir, "rows", record["id"] + ".row.json"), json.dumps(record))
    else:  # fastest
        best = fastest_train_flags(out_dir)
        print("none" if best is None else shlex.join(best))
        return 0
    render(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
