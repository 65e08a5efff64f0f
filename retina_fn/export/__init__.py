"""RetinaNet's inference for deployment: a preprocessed canvas in, a fixed number of detections out,
post-processing and NMS inside; as a torch.export program (model.pt2) and as ONNX (model.onnx), with model.json
saying how to feed it and read it.

    meta = export("runs/demo/checkpoints/ckpt_000002655.pt", "exported/demo")   # its own spec; --format auto
    run = folder.load_program("exported/demo", folder.read_spec("exported/demo"))          # run(batch) -> Detections

The program is `Detector.predict` (retina_fn/detector.py: the network, post-processing and NMS) with the weights
as constants, for one static shape: N images on one canvas H x W.

  inputs   image         float32 [N, 3, H, W]  normalised RGB, the resized image at the top left, zero elsewhere
           image_hw      int64   [N, 2]        (h, w) of each resized image
           scale_factor  float32 [N, 2]        (sx, sy) = (resized w / original w, resized h / original h)
  outputs  boxes         float32 [N, M, 4]     xyxy in original-image pixels (divided by scale_factor inside)
           scores        float32 [N, M]        sigmoid probabilities, descending
           labels        int64   [N, M]        class index 0..K-1 (model.json's label_map gives ids and names)
           valid         bool    [N, M]        True for real detections; padding rows are zero

M = the spec's test.max_per_img. One canvas serves both aspect groups (`program.export_spec`). What export changes,
with the same detections: model.test.static_shapes is set (NMS always sees model.test.max_candidates rows);
under torch.export NMS's convergence test runs as a torch.while_loop (an ONNX Loop) and the exact top-k as a
stable sort (retina_fn.nms, retina_fn.topk), which the ONNX translation maps onto TopK (`onnx`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import torch

from retina_fn import errors, trained
from retina_fn.detector import Detector
from retina_fn.export import folder, onnx
from retina_fn.export.program import InferenceModule, example_inputs, export_spec

log = logging.getLogger(__name__)

FORMATS = ("auto", "exported", "onnx", "both")


def formats_to_write(fmt: str) -> tuple[str, ...]:
    """What a format asks for: 'exported' (the .pt2) and / or 'onnx'.

    Args:
      fmt: 'auto' (the program, and ONNX when onnx and onnxscript import; one log line says when ONNX is
        skipped), 'exported', 'onnx' or 'both'.

    Returns:
      ('exported',), ('onnx',) or ('exported', 'onnx').

    Raises:
      ConfigError: an unknown format; MissingDependencyError: 'onnx' or 'both' without onnx and onnxscript (an
      explicit request is never quietly cut short).
    """
    if fmt not in FORMATS:
        raise errors.ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        if onnx.available():
            return ("exported", "onnx")
        log.warning("--format auto: writing the torch.export program only; ONNX is skipped because onnx and "
                    "onnxscript are not installed (add them with %s, or pass --format exported to silence this)",
                    onnx.INSTALL)
        return ("exported",)
    if fmt in ("onnx", "both") and not onnx.available():
        raise errors.MissingDependencyError(f"--format {fmt} needs onnx and onnxscript, which are not installed: "
                                            f"{onnx.INSTALL} (or --format exported for the torch.export program "
                                            f"alone)")
    return {"exported": ("exported",), "onnx": ("onnx",), "both": ("exported", "onnx")}[fmt]


def export(weights: str, out_dir: str, *, config=None, use_config_for: Sequence[str] = (), fmt: str = "auto",
           canvas_hw: Sequence[int] | None = None, batch: int = 1) -> dict[str, Any]:
    """Exports a trained detector: its weights and the spec they were trained with (retina_fn.trained).

    Args:
      weights: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
      out_dir: the folder to write model.pt2 / model.onnx and model.json to (created).
      config: a ConfigDict, None for the weights' own spec; use_config_for: as retina_fn.trained.load_trained's.
      fmt: 'auto', 'exported' (.pt2), 'onnx' or 'both' (see `formats_to_write`).
      canvas_hw: (H, W) of the one canvas, or None for `program.default_canvas`.
      batch: N, images per call.

    Returns:
      The content written to model.json.

    Raises:
      ConfigError: an unknown format, batch < 1, a canvas that does not fit, or a config that differs from the
      stored spec; MissingDependencyError: --format onnx or both without onnx / onnxscript; RuntimeError: torch
      older than 2.6; CheckpointMismatch: weights that do not fit.
    """
    kinds = formats_to_write(fmt)
    if not hasattr(torch.compiler, "is_exporting"):  # NMS and top-k take their export paths from it
        raise RuntimeError(f"exporting needs torch >= 2.6 (torch.compiler.is_exporting); this is {torch.__version__}")
    if batch < 1:
        raise errors.ConfigError(f"--batch must be >= 1, got {batch}")
    loaded = trained.load_trained(weights, config, use_config_for)
    spec = export_spec(loaded.spec, canvas_hw)
    canvas = tuple(spec.input.landscape_canvas)
    module = InferenceModule(Detector(spec, [canvas], "cpu"), loaded.params)

    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    with torch.no_grad():
        # Written as traced: no autocast region is traced (precision.float32_region), so the serialiser takes the
        # NMS loops as they are; run_decompositions({}) here would retrace the whole graph for nothing.
        program = torch.export.export(module, example_inputs(batch, canvas))
    log.info("torch.export: %.1f s", time.perf_counter() - started)
    files, opset = {}, None
    if "exported" in kinds:
        files["exported"] = folder.PROGRAM_FILE
        inputs, program.example_inputs = program.example_inputs, None  # saved pickled otherwise: refused on load
        torch.export.save(program, os.path.join(out_dir, folder.PROGRAM_FILE))
        program.example_inputs = inputs
    if "onnx" in kinds:
        started = time.perf_counter()
        files["onnx"] = folder.ONNX_FILE
        opset = onnx.to_onnx(program, os.path.join(out_dir, folder.ONNX_FILE))
        log.info("ONNX (opset %d): %.1f s", opset, time.perf_counter() - started)
    name = config.name if config is not None else os.path.splitext(os.path.basename(weights))[0]
    meta = folder.make_spec(spec, name=name, batch=batch, files=files, weights=weights, opset=opset)
    with open(os.path.join(out_dir, folder.SPEC_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
