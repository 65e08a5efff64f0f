"""Exports RetinaNet's inference for deployment: a preprocessed canvas in, a fixed number of detections out,
post-processing and NMS inside; as a torch.export program (.pt2) and as ONNX, with a JSON file that says how
to feed it and read it. By default (--format auto) the program always, and ONNX when onnx and onnxscript are
installed (a log line says when it is skipped); --format onnx or both without them is an error.

    python -m experiments.export --config configs/retinanet_r50_fpn_1x_coco.py \\
        --weights retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth --out exported/r50
    python -m experiments.export --config configs/demo.py --weights runs/demo/checkpoints/<newest>.pt \\
        --out exported/demo --format onnx --canvas 320x320 --batch 1 --time 20
    python -m experiments.predict --exported exported/demo --images a.jpg --out dets.json --draw vis/
    python experiments/onnx_predict.py exported/demo a.jpg        # numpy + Pillow + onnxruntime only

The program is `Detector.predict` (retina_fn/detector.py: the network, post-processing and NMS) with the
weights as constants, for one static shape: N images on one canvas H x W.

  inputs   image         float32 [N, 3, H, W]  normalised RGB, the resized image at the top left, zero elsewhere
           image_hw      int64   [N, 2]        (h, w) of each resized image
           scale_factor  float32 [N, 2]        (sx, sy) = (resized w / original w, resized h / original h)
  outputs  boxes         float32 [N, M, 4]     xyxy in original-image pixels (divided by scale_factor inside)
           scores        float32 [N, M]        sigmoid probabilities, descending
           labels        int64   [N, M]        class index 0..K-1 (the JSON's label_map gives ids and names)
           valid         bool    [N, M]        True for real detections; padding rows are zero

M = model.test.max_per_img. One canvas serves both aspect groups: --canvas, or by default the smallest canvas
holding the config's landscape and portrait canvases (1344 x 1344 for the 1x configs); data.scale must fit it
(for 512 x 512: --config.data.scale=512,512). Any config field can be overridden as in the other programs.

What export changes, with the same detections: model.test.static_shapes is set (NMS always sees
model.test.max_candidates rows instead of a data-dependent prefix); under torch.export, NMS's convergence test
runs as a torch.while_loop (an ONNX Loop) and the exact top-k as a stable sort (retina_fn.nms, retina_fn.topk);
the ONNX translation maps the stable sort onto TopK, which ONNX specifies to order equal values by index.
ONNX needs the `onnx` extra (onnx, onnxscript, onnxruntime).

Modules: export_program (the traced module, its config, example inputs), export_format (the folder: file
names, model.json, loading the program back), export_timing (--time); this one writes the folder and
translates to ONNX.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import torch
from absl import app, flags
from ml_collections import config_flags

from experiments import class_count, cli, export_timing, reporting
from experiments.benchmark.options import parse_canvas
from experiments.export_format import INPUT_NAMES, ONNX_FILE, OUTPUT_NAMES, PROGRAM_FILE, SPEC_FILE, make_spec
from experiments.export_program import InferenceModule, export_config, example_inputs
from experiments.predict import label_table
from retina_fn import errors, tree
from retina_fn.detector import Detector
from retina_fn.interop import load_detector_weights

log = logging.getLogger(__name__)

FORMATS = ("auto", "exported", "onnx", "both")
ONNX_INSTALL = "pip install -e '.[onnx]'"


def _onnx_stable_sort(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable in ONNX: TopK over the whole axis, which ONNX specifies to order equal values by
    their index (a stable sort), so the translation keeps the tie order the library relies on."""
    from onnxscript import opset18 as op  # noqa: PLC0415 - optional dependency (the onnx extra)

    size = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def onnx_available() -> bool:
    """Whether onnx and onnxscript import (the ONNX exporter's dependencies)."""
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def to_onnx(program: torch.export.ExportedProgram, path: str, input_names: Sequence[str] = INPUT_NAMES,
            output_names: Sequence[str] = OUTPUT_NAMES) -> int:
    """Translates an exported program to ONNX with torch's dynamo-based exporter and saves it at `path`.

    Args:
      program: an ExportedProgram (of an `InferenceModule`, or of any function of the library).
      path: the .onnx file to write (one file: the weights stay inside below ONNX's 2 GB limit).
      input_names, output_names: the graph's input and output names, in order.

    Returns:
      The ONNX opset of the default domain.

    Raises:
      MissingDependencyError (an ImportError): onnx or onnxscript missing (install the `onnx` extra).
    """
    if not onnx_available():
        raise errors.MissingDependencyError(f"ONNX export needs onnx and onnxscript: {ONNX_INSTALL}")
    import onnxscript.optimizer  # noqa: PLC0415 - optional dependency (the onnx extra)

    # The exporter's own optimisation (its pattern rewrites) made the R50 export at 512 x 512 take three times
    # as long for no onnxruntime speed-up beyond the noise: onnxruntime optimises the graph itself when it
    # loads it. Folding constants and dropping what is unused is enough.
    onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=list(input_names),
                                     output_names=list(output_names),
                                     custom_translation_table={torch.ops.aten.sort.stable: _onnx_stable_sort},
                                     optimize=False, verbose=False)
    onnxscript.optimizer.fold_constants(onnx_program.model)
    onnxscript.optimizer.remove_unused_nodes(onnx_program.model)
    onnx_program.save(path)
    return int(onnx_program.model.opset_imports[""])


def formats_to_write(fmt: str) -> tuple[str, ...]:
    """What a --format writes here: 'exported' (the .pt2) and / or 'onnx'.

    Args:
      fmt: 'auto' (the default: the program, and ONNX when onnx and onnxscript import; one log line says when
        ONNX is skipped and how to add it), 'exported', 'onnx' or 'both'.

    Returns:
      ('exported',), ('onnx',) or ('exported', 'onnx').

    Raises:
      ConfigError: an unknown format; MissingDependencyError: 'onnx' or 'both' asked for without onnx and
      onnxscript (an explicit request is never quietly cut short).
    """
    if fmt not in FORMATS:
        raise errors.ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        if onnx_available():
            return ("exported", "onnx")
        log.warning("--format auto: writing the torch.export program only; ONNX is skipped because onnx and "
                    "onnxscript are not installed (add them with %s, or pass --format exported to silence this)",
                    ONNX_INSTALL)
        return ("exported",)
    if fmt in ("onnx", "both") and not onnx_available():
        raise errors.MissingDependencyError(f"--format {fmt} needs onnx and onnxscript, which are not installed: "
                                            f"{ONNX_INSTALL} (or --format exported for the torch.export program "
                                            f"alone)")
    return {"exported": ("exported",), "onnx": ("onnx",), "both": ("exported", "onnx")}[fmt]


def export(cfg, weights: str, out_dir: str, *, fmt: str = "auto", canvas_hw: Sequence[int] | None = None,
           batch: int = 1) -> dict[str, Any]:
    """Exports the detector of `cfg` with the weights of a file.

    Args:
      cfg: the whole config (not changed; `export_config` makes the one exported).
      weights: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
      out_dir: the folder to write model.pt2 / model.onnx and model.json to (created).
      fmt: 'auto', 'exported' (.pt2), 'onnx' or 'both' (see `formats_to_write`).
      canvas_hw: (H, W) of the one canvas, or None for `default_canvas`.
      batch: N, images per call.

    Returns:
      The spec written to model.json.

    Raises:
      ConfigError (a ValueError): an unknown format, batch < 1, or a canvas that does not fit (see
        `export_config`); MissingDependencyError (an ImportError): --format onnx or both without onnx /
        onnxscript; RuntimeError: torch older than 2.6; CheckpointMismatch: weights that do not fit the config.
    """
    kinds = formats_to_write(fmt)
    if not hasattr(torch.compiler, "is_exporting"):  # NMS and top-k take their export paths from it
        raise RuntimeError(f"exporting needs torch >= 2.6 (torch.compiler.is_exporting); this is {torch.__version__}")
    if batch < 1:
        raise errors.ConfigError(f"--batch must be >= 1, got {batch}")
    cfg = export_config(cfg, canvas_hw)
    class_count.from_weights(cfg, weights)
    params, meta, _ = load_detector_weights(weights, cfg.model)
    params = tree.cast(params, torch.float32, "cpu")
    category_ids, names = label_table(int(cfg.model.num_classes), meta)
    canvas = tuple(cfg.data.landscape_canvas)
    module = InferenceModule(Detector(cfg.model, [canvas], "cpu"), params)

    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    with torch.no_grad():
        # Written as traced (torch.export's default IR); the ONNX exporter decomposes a copy itself. No autocast
        # region is traced (precision.float32_region), so the serialiser takes the NMS loops as they are, and a
        # run_decompositions({}) here would retrace the whole graph for nothing (a third of the export's time).
        program = torch.export.export(module, example_inputs(batch, canvas))
    log.info("torch.export: %.1f s", time.perf_counter() - started)
    files, opset = {}, None
    if "exported" in kinds:
        files["exported"] = PROGRAM_FILE
        torch.export.save(program, os.path.join(out_dir, PROGRAM_FILE))
    if "onnx" in kinds:
        started = time.perf_counter()
        files["onnx"] = ONNX_FILE
        opset = to_onnx(program, os.path.join(out_dir, ONNX_FILE))
        log.info("ONNX (opset %d): %.1f s", opset, time.perf_counter() - started)
    spec = make_spec(cfg, batch=batch, category_ids=category_ids, names=names, files=files, weights=weights,
                     opset=opset)
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=1)
    return spec


def define_flags() -> dict[str, Any]:
    """The command-line flags (defined only when run as a program), as {name: FlagHolder}."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                                  lock_config=True),
        "weights": flags.DEFINE_string("weights", None, "A retina_fn checkpoint, or torchvision / mmdetection "
                                                        "RetinaNet weights."),
        "out": flags.DEFINE_string("out", None, "Folder for model.pt2 / model.onnx and model.json."),
        "format": flags.DEFINE_enum("format", "auto", list(FORMATS), "What to write: the torch.export program "
                                    "(.pt2), ONNX, or both; 'auto': the program, and ONNX when onnx is installed."),
        "canvas": flags.DEFINE_string("canvas", None, "HxW of the one canvas (multiples of model.size_divisor); "
                                      "default: the smallest holding data.landscape_canvas and portrait_canvas."),
        "batch": flags.DEFINE_integer("batch", 1, "Images per call (N)."),
        "time": flags.DEFINE_integer("time", 0, "After exporting, time this many calls of experiments.predict's "
                                     "eager step, the exported program and onnxruntime per round and print their "
                                     "median images/s by the wall clock and per CPU second (0: no timing)."),
        "rounds": flags.DEFINE_integer("rounds", 3, "Rounds of --time, alternating the runtimes."),
    }


def main(argv, holders: dict[str, Any]):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    reporting.set_log_level(logging.INFO)
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per rewritten node otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    value = {name: holder.value for name, holder in holders.items()}
    canvas = parse_canvas(value["canvas"]) if value["canvas"] else None
    spec = export(value["config"], value["weights"], value["out"], fmt=value["format"], canvas_hw=canvas,
                  batch=value["batch"])
    log.info("exported %s (canvas %dx%d, batch %d) to %s: %s", spec["name"], *spec["canvas"], spec["batch"],
             value["out"], ", ".join(sorted(spec["files"].values()) + [SPEC_FILE]))
    if value["time"] > 0:
        rates = export_timing.time_export(value["config"], value["weights"], value["out"], value["time"],
                                          value["rounds"])
        print(f"images/s on a {spec['canvas'][0]}x{spec['canvas'][1]} canvas, batch {spec['batch']}, "
              f"{torch.get_num_threads()} threads, median of {value['rounds']} rounds of {value['time']} calls "
              f"(wall clock / per CPU second): "
              + ", ".join(f"{k} {w:.2f} / {c:.2f}" for k, (w, c) in rates.items()))


if __name__ == "__main__":
    _holders = define_flags()
    flags.mark_flags_as_required(["config", "weights", "out"])
    cli.run(lambda argv: main(argv, _holders))

