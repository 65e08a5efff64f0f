"""The core takes the typed spec and plain arguments, never a config: it runs where the config library cannot
even be imported, and no core module reads a config's fields with defaults of its own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from configs import smoke
from retina_fn import schema

ROOT = Path(__file__).resolve().parents[1]
# The core (docs/conventions.md, layers 0 to 4): what `schema` builds the spec for.
CORE = ["spec.py", "tree.py", "rng.py", "precision.py", "boxes.py", "topk.py", "nms.py", "extent.py", "anchors.py",
        "nn", "assign.py", "focal_loss.py", "losses.py", "postprocess.py", "optim", "model", "detector.py", "train"]

_PROGRAM = textwrap.dedent("""
    import json, sys
    sys.modules["ml_collections"] = None  # any import of the config library now fails
    import torch
    from retina_fn import rng, spec as spec_lib
    from retina_fn.data.random_batch import random_batch
    from retina_fn.detector import Detector
    from retina_fn.model import retinanet
    from retina_fn.optim import OptimSettings
    from retina_fn.precision import LossScaleSettings
    from retina_fn.train import StepSettings, build_optimizer, full_params, init_train_state, make_eval_step
    from retina_fn.train import make_train_step
    stored = json.loads(sys.argv[1])
    spec = spec_lib.from_json(stored["spec"])
    settings = StepSettings(**dict(stored["settings"], optim=OptimSettings(**stored["settings"]["optim"]),
                                   loss_scale=LossScaleSettings(**stored["settings"]["loss_scale"])))
    optimizer = build_optimizer(settings)
    state = init_train_state(spec, settings, rng.key(0), optimizer)
    step = make_train_step(spec, settings, optimizer, steps_per_epoch=10, global_batch=2)
    batch = random_batch(batch_size=2, canvas=spec.input.landscape_canvas, max_boxes=16,
                         num_classes=spec.num_classes, seed=0)
    state, metrics = step(state, batch)
    detections = make_eval_step(spec)(full_params(state), batch)
    print(json.dumps({"loss": float(metrics["loss"]), "finite": float(metrics["finite"]),
                      "rows": list(detections.scores.shape), "step": int(state["step"])}))
""")


def _settings_json(settings) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(settings)))


def test_a_train_step_and_an_eval_step_run_without_the_config_library():
    cfg = smoke.get_config()
    cfg.model.num_classes = 5
    spec, settings = schema.detector_spec(cfg), schema.step_settings(cfg)
    stored = json.dumps({"spec": spec.to_json(), "settings": _settings_json(settings)})
    done = subprocess.run([sys.executable, "-c", _PROGRAM, stored], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["finite"] == 1.0 and out["loss"] > 0 and out["step"] == 1
    assert out["rows"] == [2, spec.test.max_per_img]


def _core_files():
    for name in CORE:
        path = ROOT / "retina_fn" / name
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def test_no_core_module_takes_a_config_or_reads_one_with_defaults():
    found = []
    for path in _core_files():
        source = path.read_text()
        assert "ml_collections" not in source, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{path.name}:{node.lineno} {node.name}({a.arg})" for a in node.args.args + node.args.kwonlyargs
                          if a.arg.endswith("cfg")]
            # cfg.get("field", default): a default of the core's own beside the config's
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("cfg")):
                found.append(f"{path.name}:{node.lineno} {node.func.value.id}.get(...)")
    assert found == []
