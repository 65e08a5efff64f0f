"""The GPU suite (scripts/gpu_benchmark.sh over experiments.benchmark, its report experiments/benchmark/suite.py)
on the CPU: the report's arithmetic and marks (WRONG, timeout, skipped) from hand-made rows, the script's flags and
its explicit zeros, and a dry run of real R50 rows through the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.benchmark import suite
from experiments.benchmark.subjects import torchvision_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_benchmark.sh")
FLAGS = ["--config", "configs/retinanet_r50_fpn_1x_coco.py", "--canvas", "800x1344", "--batch", "16",
         "--precision", "bf16"]


def script(out, *args, timeout=120) -> subprocess.CompletedProcess:
    """Runs the script; when the test stops it first (a timeout), TERM lets the script end its row's processes."""
    proc = subprocess.Popen(["bash", SCRIPT, str(out), *args], cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def measured(ips: float, flops=None, check=None, tv_ips=None) -> dict:
    entry = {"images_per_s": ips, "flops_per_image": flops, "first_call_s": 9.0, "peak_memory_mb": 27 * 1024.0,
             "step_s": {"median": 16 / ips, "p10": 0.1, "p90": 0.2}, "check": check}
    result = {"ours": entry, "machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0",
                                         "cudnn": 91000}}
    if tv_ips:
        result.update(torchvision=dict(entry, images_per_s=tv_ips, check=None), torchvision_version="0.26.0",
                      speedup_vs_torchvision={"paired": 1.49})
    return result


def add_row(out, row_id, mode, name, status, note="", result=None, flags=()):
    if result is not None:
        with open(os.path.join(out, "rows", f"{row_id}.json"), "w") as f:
            json.dump(result, f)
    assert suite.main([str(out), "row", row_id, mode, name, "0", status, note, "--", *flags]) == 0


def test_the_report_computes_ratios_and_marks_wrong_timed_out_and_skipped_rows(tmp_path):
    os.makedirs(tmp_path / "rows")
    assert suite.main([str(tmp_path), "start", "--dry-run=0", "--budget=540", "--compile-cap=200", "--", *FLAGS]) == 0
    good = {"steps": 2, "ok": True, "failed": [], "tolerance": {"loss": 0.02, "update": 0.05},
            "differences": {"loss": [0.001, 0.002], "update": 0.01}}
    bad = dict(good, ok=False, failed=["update"], differences={"loss": [0.001, 0.002], "update": 0.3})
    add_row(tmp_path, "00_train_eager", "train", "eager", "ok", "20 s", measured(80.0, flops=1.4e12))
    add_row(tmp_path, "01_train_cuda_graph", "train", "cuda_graph", "ok", "", measured(120.0, check=good),
            ["--config.train.cuda_graph=True", "--check-steps=2", "--skip-flops"])
    add_row(tmp_path, "02_train_torchvision", "train", "torchvision", "ok", "", measured(80.0, tv_ips=60.0))
    add_row(tmp_path, "03_train_fused", "train", "fused_focal+cuda_graph", "ok", "", measured(150.0, check=bad))
    add_row(tmp_path, "04_train_compile", "train", "compile", "timeout", "stopped at its limit of 200 s")
    add_row(tmp_path, "05_infer_torchvision", "infer", "torchvision", "skipped", "torchvision is not installed")
    add_row(tmp_path, "06_train_error", "train", "box_buckets", "ok", "")  # exited 0 but wrote no JSON
    assert suite.fastest_train_flags(str(tmp_path)) == ["--config.train.cuda_graph=True"]  # not the WRONG row
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {r["name"]: r for r in result["rows"] if r["mode"] == "train"}
    graph = rows["cuda_graph"]
    assert graph["x_eager"] == pytest.approx(1.5) and graph["x_torchvision"] == pytest.approx(2.0)
    assert graph["achieved_tflops"] == pytest.approx(1.4e12 * 120 / 1e12)  # the eager row's FLOPs
    assert graph["mfu"] == pytest.approx(graph["achieved_tflops"] / 989.0) and result["peak_tflops"] == 989.0
    assert rows["torchvision"]["result"]["images_per_s"] == 60.0  # its own subject, not ours beside it
    assert rows["fused_focal+cuda_graph"]["status"] == "WRONG" and rows["box_buckets"]["status"] == "error"
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "NVIDIA H100 80GB HBM3 | torch 2.11.0+cu130 | CUDA 13.0 | cuDNN 91000 | torchvision 0.26.0" in table
    assert "| train | cuda_graph | 120.0 | 0.1333 (0.1000-0.2000) | 9.0 | 27.0 | 1.50 | 2.00 | 168.0 (17.0%) | " \
           "matches (2 steps, largest difference 0.2 of its tolerance) | ok |" in table
    assert "| WRONG: update (2 steps, largest difference 6 of its tolerance) | WRONG |" in table
    assert "| train | compile | - | - | - | - | - | - | - | - | timeout; stopped at its limit of 200 s |" in table
    assert "| infer | torchvision | - |" in table and "skipped; torchvision is not installed |" in table
    assert "ours eager 1.49x torchvision, paired in this process" in table
    assert "| train | box_buckets | - |" in table and "error; no result file |" in table


def test_explicit_zeros_and_bad_arguments_of_the_script(tmp_path):
    done = script(tmp_path / "none", "--dry-run", "--budget=0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "none" / "gpu_suite.json").read_text())
    assert result["plan"]["budget"] == 0 and len(result["rows"]) == 14
    assert {(r["status"], r["note"]) for r in result["rows"]} == {("skipped", "the budget of 0 s was spent"),
                                                                  *([] if torchvision_available() else [
                                                                      ("skipped", "torchvision is not installed")])}
    assert "skipped; the budget of 0 s was spent" in (tmp_path / "none" / "gpu_suite.log").read_text()
    done = script(tmp_path / "uncompiled", "--dry-run", "--only-compiled", "--compile-cap", "0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "uncompiled" / "gpu_suite.json").read_text())["rows"]
    assert [(r["mode"], r["name"], r["note"]) for r in rows] == [
        ("train", "compile", "--compile-cap=0"), ("train", "compile+cuda_graph", "--compile-cap=0"),
        ("infer", "compile", "--compile-cap=0")]
    for args, message in ((["--budget=-1"], "take whole seconds >= 0, got '-1'"),
                          (["--compile-cap="], "got ''"), (["--fast"], "unknown argument '--fast'")):
        done = script(tmp_path / "bad", *args)
        assert done.returncode == 2 and message in done.stderr and done.stderr.startswith("error: "), done.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)  # four R50 processes: minutes on a busy 2-core machine
def test_a_dry_run_of_real_rows_through_the_script(tmp_path):
    """R50 rows at 128x128 on the CPU: a graphed train row (on the CPU the graph runs eagerly and its eager check
    passes), torchvision's inference (skipped where it is not installed), the profile of the fastest train row,
    and a compiled row stopped by a 5 s cap."""
    out = tmp_path / "suite"
    done = script(out, "--dry-run", "--rows", "train:cuda_graph,infer:torchvision,profile,train:compile",
                  "--compile-cap=5", timeout=2300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {"gpu_suite.json", "gpu_suite.log", "gpu_suite.md", "rows"} == set(os.listdir(out))
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["plan"]["dry_run"] and "128x128" in result["plan"]["flags"]
    rows = {(r["mode"], r["name"]): r for r in result["rows"]}
    assert list(rows) == [("train", "cuda_graph"), ("infer", "torchvision"), ("train", "compile")]
    graph = rows[("train", "cuda_graph")]
    assert graph["status"] == "ok" and graph["check"]["ok"] and graph["check"]["steps"] == 2
    assert graph["check"]["differences"]["update"] == 0.0 and graph["result"]["images_per_s"] > 0
    tv = rows[("infer", "torchvision")]
    if torchvision_available():
        assert tv["status"] == "ok" and tv["result"]["images_per_s"] > 0 and tv["paired_vs_torchvision"] > 0
    else:
        assert (tv["status"], tv["note"]) == ("skipped", "torchvision is not installed")
    assert rows[("train", "compile")]["status"] == "timeout"
    assert result["profile"]["flags"][0] == "--config.train.cuda_graph=True"
    assert "aten::" in result["profile"]["profile"]["table"]
    table = (out / "gpu_suite.md").read_text()
    assert "| train | cuda_graph |" in table
    assert "| matches (2 steps, largest difference 0 of its tolerance) | ok;" in table
    assert "timeout; stopped at its limit of 5 s" in table and "Top operations of the fastest train row" in table
    assert "== [" in (out / "gpu_suite.log").read_text()
