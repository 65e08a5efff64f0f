"""`experiments.export --time N`: images/s of the eager step, the exported program and onnxruntime on one
random batch of the export's shape, alternating the runtimes round by round."""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from typing import Any, Callable

import torch

from retina_fn import trained
from retina_fn.export.folder import load_program, read_spec
from retina_fn.export.program import export_spec
from retina_fn.train import make_eval_step


def time_export(weights: str, out_dir: str, iters: int, rounds: int = 3, config=None,
                use_config_for=()) -> dict[str, tuple[float, float]]:
    """Images/s of each runtime present on the export in `out_dir`: each round warms up, then times `iters` calls
    of every runtime in turn, so a load change touches all alike; the median over `rounds` is reported.

    Args:
      weights, config, use_config_for: what was given to `export`; the eager step runs on the export's canvas
        with the detector's own test.static_shapes.

    Returns:
      {'eager' | 'exported' | 'onnxruntime': (images per wall-clock second, images per process CPU second)}.
    """
    gc.collect()  # the export's graphs, so that collections during the timing do not walk them
    meta = read_spec(out_dir)
    loaded = trained.load_trained(weights, config, use_config_for)
    eager_spec = export_spec(loaded.spec, meta["canvas"])
    static = loaded.spec.test.static_shapes
    eager_spec = eager_spec.replace(test=dataclasses.replace(eager_spec.test, static_shapes=static))
    n, (h, w) = int(meta["batch"]), meta["canvas"]
    image = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    batch = {"image": image, "image_hw": torch.tensor([[h, w]] * n), "scale_factor": torch.ones(n, 2)}
    eval_step = make_eval_step(eager_spec, "cpu")
    calls: dict[str, Callable[[], Any]] = {"eager": lambda: eval_step(loaded.params, batch)}
    if "exported" in meta["files"]:
        run = load_program(out_dir, meta)
        calls["exported"] = lambda: run(batch)
    if "onnx" in meta["files"]:
        import onnxruntime  # noqa: PLC0415 - optional dependency (the onnx extra)

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch uses, for a like comparison
        session = onnxruntime.InferenceSession(os.path.join(out_dir, meta["files"]["onnx"]), options,
                                               providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in batch.items()}
        calls["onnxruntime"] = lambda: session.run(None, feed)
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            started, started_cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                call()
            wall[name].append(n * iters / (time.perf_counter() - started))
            cpu[name].append(n * iters / (time.process_time() - started_cpu))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}
