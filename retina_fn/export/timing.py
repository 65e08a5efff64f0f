"""`python -m experiments.export --time N`: images/s of experiments.predict's eager step, the exported program
and onnxruntime on one random batch of the export's shape, alternating the runtimes round by round.

    rates = time_export(weights, "exported/demo", iters=20)   # {'eager': (wall, cpu), 'exported': ..., ...}
"""

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


def _images_per_second(calls: dict[str, Callable[[], Any]], images: int, iters: int, rounds: int
                       ) -> dict[str, tuple[float, float]]:
    """Median images/s of each call over `rounds` rounds, by the wall clock and by this process's CPU time (the
    latter moves less when other processes share the cores; with one thread the two agree on a quiet machine).
    A round makes one warm-up call of each and then times `iters` calls of each in turn, so a load change on
    the machine touches all of them alike.

    Returns:
      {name: (images per wall-clock second, images per CPU second)}.
    """
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            started, started_cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                call()
            wall[name].append(images * iters / (time.perf_counter() - started))
            cpu[name].append(images * iters / (time.process_time() - started_cpu))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}


def time_export(weights: str, out_dir: str, iters: int, rounds: int = 3, config=None,
                use_config_for=()) -> dict[str, tuple[float, float]]:
    """Images/s of experiments.predict's eager step, the exported program and onnxruntime on one random batch
    of the export's shape (onnxruntime with as many threads as torch uses; see `_images_per_second`).

    Args:
      weights, config, use_config_for: what was given to `export`; the eager step runs the trained detector on
        the export's canvas with its own test.static_shapes (same detections, see `program.export_spec`).
      out_dir: the export folder.
      iters: calls timed per runtime and round.
      rounds: rounds; the median is reported.

    Returns:
      {'eager' | 'exported' | 'onnxruntime': (images/s by the wall clock, images per CPU second)} for the
      runtimes present.
    """
    gc.collect()  # the export's graphs, so that collections during the timing do not walk them
    meta = read_spec(out_dir)
    loaded = trained.load_trained(weights, config, use_config_for)
    eager_spec = export_spec(loaded.spec, meta["canvas"])
    eager_spec = eager_spec.replace(test=dataclasses.replace(eager_spec.test,
                                                             static_shapes=loaded.spec.test.static_shapes))
    n, (h, w) = int(meta["batch"]), meta["canvas"]
    image = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    batch = {"image": image, "image_hw": torch.tensor([[h, w]] * n), "scale_factor": torch.ones(n, 2)}
    eval_step = make_eval_step(eager_spec, "cpu")
    calls = {"eager": lambda: eval_step(loaded.params, batch)}
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
    return _images_per_second(calls, n, iters, rounds)
