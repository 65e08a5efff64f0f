"""The prepared GPU suite (experiments/benchmark/suite.py, scripts/gpu_benchmark.sh) on the CPU: its dry run end
to end through the script, the worker process and its time cap, skipped rows, the bucketed batch, and the
table's arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from configs import smoke
from experiments.benchmark import suite, suite_plan, suite_report
from experiments.benchmark.torchvision_ref import torchvision_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_script_dry_run_measures_every_row_and_writes_json_markdown_and_log(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_benchmark.sh"), str(out), "--dry-run",
                           "--compile-cap=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["gpu_suite.json", "gpu_suite.log", "gpu_suite.md"]
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["dry_run"] and result["plan"]["config"] == "smoke" and result["machine"]["torch"]
    rows = {(r["mode"], r["name"]): r for r in result["rows"]}
    assert list(rows) == [(r.mode, r.name) for r in suite_plan.gpu_rows() if not r.worker] + \
        [(r.mode, r.name) for r in suite_plan.gpu_rows() if r.worker]
    for (mode, name), r in rows.items():
        if name == "torchvision" and not torchvision_available():
            assert r["status"] == "skipped" and "not installed" in r["note"]
        elif not suite_plan.gpu_rows()[[(x.mode, x.name) for x in suite_plan.gpu_rows()].index((mode, name))].worker:
            assert r["status"] == "ok", (mode, name, r.get("note"))
            assert r["result"]["images_per_s"] > 0 and r["x_eager"] > 0
    # on a CPU the graph rows say that they ran eagerly, and why
    assert any("without CUDA graphs on cpu" in line for line in rows[("train", "cuda_graph")]["log"])
    # the compile time cap: the worker's first row timed out (or the worker was still starting), the others
    # never started
    assert rows[("train", "compile+cuda_graph")]["status"] in ("timeout", "skipped")
    assert rows[("train", "compile")]["status"] == rows[("infer", "compile")]["status"] == "skipped"
    for name in ("compile+cuda_graph", "compile"):
        assert rows[("train", name)]["note"].startswith("the compile time cap (3 s) ran out")
    assert rows[("train", "eager")]["result"]["flops_per_image"] > 0
    assert "table" in result["profile"] and "aten::" in result["profile"]["table"]
    table = (out / "gpu_suite.md").read_text()
    assert "| train | cuda_graph |" in table and "the compile time cap (3 s) ran out" in table
    assert "Top kernels" in table
    assert "| train | eager |" in (out / "gpu_suite.log").read_text()


def test_the_worker_runs_its_rows_in_a_process_and_skips_missing_fields(tmp_path):
    plan = suite_plan.gpu_plan(dry_run=True)
    rows = [suite_plan.Row("train", "eager", "eager"),
            suite_plan.Row("train", "future_flag", "a flag no config has yet", {"model.loss.no_such_flag": True})]
    results = suite.run_worker_rows(rows, plan, str(tmp_path), timeout_s=300)
    assert results["train eager"]["status"] == "ok" and results["train eager"]["result"]["images_per_s"] > 0
    assert results["train eager"]["seconds"] > 0
    assert results["train future_flag"] == {"status": "skipped", "seconds": results["train future_flag"]["seconds"],
                                            "note": "the config has no model.loss.no_such_flag (not implemented yet)"}
    assert os.listdir(tmp_path) == []  # the spec and results files are removed


def test_missing_fields_names_the_overrides_a_config_lacks():
    cfg = smoke.get_config()
    assert suite_plan.missing_fields(cfg, {"data.box_buckets": (8,), "model.loss.fused_focal": True}) == []
    assert suite_plan.missing_fields(cfg, {"data.nope": 1, "nope.deeper": 2}) == ["data.nope", "nope.deeper"]


def test_ratios_and_the_markdown_table():
    def ok(mode, name, ips, flops=None):
        return {"mode": mode, "name": name, "status": "ok", "log": [],
                "result": {"images_per_s": ips, "flops_per_image": flops, "first_call_s": 1.0,
                           "peak_memory_mb": 2048.0, "step_s": {"median": 16 / ips, "p10": 0.1, "p90": 0.2}}}

    rows = [ok("train", "eager", 80.0, 1.4e12), ok("train", "cuda_graph", 120.0), ok("train", "torchvision", 60.0),
            {"mode": "train", "name": "compile", "status": "timeout", "note": "the cap ran out after 300 s"},
            {"mode": "infer", "name": "cuda_graph", "status": "ok", "log": ["WARNING: capture failed | eager"],
             "result": ok("infer", "x", 300.0)["result"]}]
    suite_report.add_ratios(rows, peak_tflops=989.0)
    graph_row = rows[1]
    assert graph_row["x_eager"] == pytest.approx(1.5) and graph_row["x_torchvision"] == pytest.approx(2.0)
    assert graph_row["achieved_tflops"] == pytest.approx(1.4e12 * 120 / 1e12)
    assert graph_row["mfu"] == pytest.approx(graph_row["achieved_tflops"] / 989.0)
    assert rows[4]["x_eager"] is None and rows[4]["mfu"] is None  # infer has no eager row or FLOPs here
    result = {"suite": "gpu", "dry_run": False, "elapsed_s": 420.0, "rows": rows, "profile": None,
              "plan": suite_plan.gpu_plan()._replace(rows=None)._asdict(),
              "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91000,
                          "torchvision": None, "compile_scope_auto": "gradients"}}
    table = suite_report.markdown(result)
    assert "NVIDIA H200 | torch 2.11.0+cu130 | CUDA 13.0" in table and "torchvision not installed" in table
    assert "| train | cuda_graph | 120.0 |" in table and "| 1.50 | 2.00 | 168.0 (17.0%) | ok |" in table
    assert "| train | compile | - |" in table and "timeout; the cap ran out after 300 s |" in table
    assert "ok; WARNING: capture failed / eager |" in table  # a logged fallback shows; '|' cannot break the row
