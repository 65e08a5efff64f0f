"""The worker process of a benchmark suite: runs the rows of a spec file one after another and rewrites its
results file after each, so that the rows it finished survive being killed at the suite's time cap.

    python -m experiments.benchmark.worker SPEC.json     # started by experiments.benchmark.suite

The spec: {'plan': Plan fields with 'rows' (Row fields each), 'out': the results file}. The results file:
{'<mode> <name>': run_row's dict, or {'status': 'running', 'started': unix time} for the row in progress}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _tuples(value):
    """JSON's lists back into the tuples configs hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def main(spec_path: str) -> None:
    """Runs the spec's rows (see the module docstring)."""
    from experiments.benchmark import suite, suite_plan
    from retina_fn.parallel import backend

    with open(spec_path) as f:
        spec = json.load(f)
    rows = [suite_plan.Row(r["mode"], r["name"], r["doc"], {k: _tuples(v) for k, v in r["overrides"].items()},
                           r["worker"])
            for r in spec["plan"]["rows"]]
    plan = suite_plan.Plan(**{**spec["plan"], "canvas": tuple(spec["plan"]["canvas"]), "rows": tuple(rows)})
    device = backend.resolve_device(plan.device).device
    cfg = suite_plan.load_config(plan)
    results: dict = {}

    def write() -> None:
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, default=str)
        os.replace(tmp, spec["out"])

    for row in rows:
        key = f"{row.mode} {row.name}"
        results[key] = {"status": "running", "started": time.time()}
        write()
        started = time.perf_counter()
        results[key] = dict(suite.run_row(cfg, row, plan, device), seconds=time.perf_counter() - started)
        write()


if __name__ == "__main__":
    main(sys.argv[1])
