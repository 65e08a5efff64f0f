"""Exports RetinaNet's inference for deployment: a preprocessed canvas in, a fixed number of detections out,
post-processing and NMS inside; as a torch.export program (.pt2) and as ONNX, with a JSON file that says how
to feed it and read it.

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
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from absl import app, flags
from ml_collections import config_flags

from experiments import class_count, reporting
from experiments.benchmark.options import parse_canvas
from experiments.export_format import (INPUT_NAMES, ONNX_FILE, OUTPUT_NAMES, PROGRAM_FILE, SPEC_FILE, SPEC_FORMAT,
                                       SPEC_VERSION, load_program, read_spec)
from experiments.predict import label_table
from retina_fn import tree
from retina_fn.detector import Detector
from retina_fn.interop import load_detector_weights
from retina_fn.train import make_eval_step

log = logging.getLogger(__name__)

FORMATS = ("exported", "onnx", "both")

_SIZE_RULES = {
    "mmdet": "s = min(long_max / max(h, w), short_max / min(h, w)); new_h = int(h * s + 0.5), "
             "new_w = int(w * s + 0.5) (rounded)",
    "torchvision": "s = min(short_max / min(h, w), long_max / max(h, w)); new_h = int(h * s), new_w = int(w * s) "
                   "(floored)",
}
_RESIZES = {
    "mmdet": "the uint8 RGB image is resized bilinearly to (new_h, new_w) with half-pixel centres "
             "(source = (dest + 0.5) * in / out - 0.5, clamped to the edges), no antialiasing, back to uint8 "
             "(separable, the horizontal pass first, each pass with fixed-point weights and rounded to uint8: "
             "experiments/onnx_predict.py does it bit for bit; OpenCV's INTER_LINEAR is within 1 level of it), "
             "then normalised per channel in float32: (pixel - mean) * float32(1 / std)",
    "torchvision": "the uint8 RGB image is normalised per channel in float32, (pixel / 255 - mean / 255) / "
                   "(std / 255), then the float image is resized bilinearly to (new_h, new_w) with half-pixel "
                   "centres (source = (dest + 0.5) * in / out - 0.5, clamped to the edges), no antialiasing",
}


class InferenceModule(torch.nn.Module):
    """`Detector.predict` with the parameters closed over, as the module torch.export traces.

    Args:
      detector: the Detector of the export config (its anchors for the canvas are computed once).
      params: the full parameter tree, float32 on the CPU; they become constants of the program.
    """

    def __init__(self, detector: Detector, params: dict):
        super().__init__()
        self._detector = detector
        self._params = params

    def forward(self, image: torch.Tensor, image_hw: torch.Tensor, scale_factor: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: image float32 [N, 3, H, W], image_hw int64 [N, 2], scale_factor float32 [N, 2].
        Returns: (boxes float32 [N, M, 4], scores float32 [N, M], labels int64 [N, M], valid bool [N, M])."""
        detections = self._detector.predict(self._params, {"image": image, "image_hw": image_hw,
                                                           "scale_factor": scale_factor})
        return tuple(detections)


def default_canvas(data_cfg) -> tuple[int, int]:
    """The smallest canvas holding both configured canvases: (max H, max W) of data.landscape_canvas and
    data.portrait_canvas, e.g. (1344, 1344) for (800, 1344) and (1344, 800)."""
    land, port = tuple(data_cfg.landscape_canvas), tuple(data_cfg.portrait_canvas)
    return max(land[0], port[0]), max(land[1], port[1])


def export_config(cfg, canvas_hw: Sequence[int] | None = None):
    """The config an export runs: one canvas for both aspect groups and static shapes in post-processing.

    Args:
      cfg: the whole config (not changed).
      canvas_hw: (H, W), or None for `default_canvas`.

    Returns:
      A copy of cfg with data.landscape_canvas = data.portrait_canvas = the canvas and
      model.test.static_shapes = True.

    Raises:
      ValueError: a canvas that is not a multiple of model.size_divisor, or that cannot hold every image
        resized with data.scale (naming --canvas and --config.data.scale).
    """
    cfg = cfg.copy_and_resolve_references()
    canvas = tuple(int(v) for v in (default_canvas(cfg.data) if canvas_hw is None else canvas_hw))
    divisor = int(cfg.model.size_divisor)
    if len(canvas) != 2 or min(canvas) <= 0 or canvas[0] % divisor or canvas[1] % divisor:
        raise ValueError(f"--canvas {canvas} must be two positive multiples of model.size_divisor={divisor}")
    longest = max(cfg.data.scale)
    if min(canvas) < longest:
        raise ValueError(f"--canvas {canvas[0]}x{canvas[1]} cannot hold every image resized with data.scale="
                         f"{tuple(cfg.data.scale)} (one canvas serves landscape and portrait images, so both "
                         f"sides need >= {longest}): pass a larger --canvas or a smaller scale, e.g. "
                         f"--config.data.scale={min(canvas)},{min(canvas)}")
    cfg.data.landscape_canvas = canvas
    cfg.data.portrait_canvas = canvas
    cfg.model.test.static_shapes = True
    return cfg


def example_inputs(batch: int, canvas_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the exported shapes: a zero image [N, 3, H, W], image_hw = the canvas [N, 2], scale 1 [N, 2]."""
    h, w = (int(v) for v in canvas_hw)
    return (torch.zeros(batch, 3, h, w), torch.tensor([[h, w]] * batch, dtype=torch.int64),
            torch.ones(batch, 2))


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
      ImportError: onnx or onnxscript missing (install the `onnx` extra).
    """
    if not onnx_available():
        raise ImportError("ONNX export needs onnx and onnxscript: pip install -e '.[onnx]'")
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


def make_spec(cfg, *, batch: int, category_ids: Sequence[int], names: Sequence[str], files: dict[str, str],
              weights: str, opset: int | None) -> dict[str, Any]:
    """The JSON description written beside the programs (see the module docstring for the tensors).

    Args:
      cfg: the export config (`export_config`).
      batch: N, images per call.
      category_ids, names: per class index, as experiments.predict.label_table gives them.
      files: {'exported': file name, 'onnx': file name}, those written.
      weights: the weights file the parameters came from (its base name is recorded).
      opset: the ONNX opset, or None without ONNX.

    Returns:
      A JSON-serialisable dict.
    """
    h, w = cfg.data.landscape_canvas
    m = int(cfg.model.test.max_per_img)
    mode = str(cfg.data.resize_mode)
    test = cfg.model.test
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "name": str(cfg.name),
        "weights": os.path.basename(weights),
        "files": dict(files),
        "onnx_opset": opset,
        "batch": batch,
        "canvas": [h, w],
        "precision": "float32",
        "max_detections": m,
        "inputs": [
            {"name": "image", "dtype": "float32", "shape": [batch, 3, h, w],
             "meaning": "normalised RGB (see preprocess), each resized image at the top left, zero elsewhere"},
            {"name": "image_hw", "dtype": "int64", "shape": [batch, 2], "meaning": "(h, w) of each resized image"},
            {"name": "scale_factor", "dtype": "float32", "shape": [batch, 2],
             "meaning": "(new_w / w, new_h / h): resized over original size; (1, 1) gives boxes in canvas pixels"},
        ],
        "outputs": [
            {"name": "boxes", "dtype": "float32", "shape": [batch, m, 4],
             "meaning": "x1, y1, x2, y2 in original-image pixels"},
            {"name": "scores", "dtype": "float32", "shape": [batch, m], "meaning": "descending probabilities"},
            {"name": "labels", "dtype": "int64", "shape": [batch, m], "meaning": "class index into label_map"},
            {"name": "valid", "dtype": "bool", "shape": [batch, m],
             "meaning": "True for real detections (the first rows); padding rows are zero"},
        ],
        "preprocess": {
            "resize_mode": mode,
            "scale": [int(v) for v in cfg.data.scale],
            "mean": [float(v) for v in cfg.data.mean],
            "std": [float(v) for v in cfg.data.std],
            "color": "RGB",
            "size": _SIZE_RULES[mode].replace("long_max", f"long_max={max(cfg.data.scale)}")
                                     .replace("short_max", f"short_max={min(cfg.data.scale)}"),
            "resize": _RESIZES[mode],
            "pad": f"the normalised image at rows < new_h and columns < new_w of a zero [3, {h}, {w}] canvas",
        },
        "boxes_to_original": "done inside: boxes are divided by (sx, sy, sx, sy) from scale_factor; not clipped "
                             "afterwards (they are clipped to image_hw before the division)",
        "label_map": {"category_ids": [int(i) for i in category_ids], "names": [str(n) for n in names]},
        "postprocess": {"score_thr": float(test.score_thr), "nms_iou": float(test.nms_iou),
                        "nms_pre": int(test.nms_pre), "pre_select": str(test.pre_select),
                        "max_per_img": m, "max_candidates": int(test.max_candidates)},
    }


def export(cfg, weights: str, out_dir: str, *, fmt: str = "both", canvas_hw: Sequence[int] | None = None,
           batch: int = 1) -> dict[str, Any]:
    """Exports the detector of `cfg` with the weights of a file.

    Args:
      cfg: the whole config (not changed; `export_config` makes the one exported).
      weights: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
      out_dir: the folder to write model.pt2 / model.onnx and model.json to (created).
      fmt: 'exported' (.pt2), 'onnx' or 'both'.
      canvas_hw: (H, W) of the one canvas, or None for `default_canvas`.
      batch: N, images per call.

    Returns:
      The spec written to model.json.

    Raises:
      ValueError: an unknown format, batch < 1, or a canvas that does not fit (see `export_config`);
      RuntimeError: torch older than 2.6; ImportError: ONNX without onnx / onnxscript; CheckpointMismatch:
      weights that do not fit the config.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if not hasattr(torch.compiler, "is_exporting"):  # NMS and top-k take their export paths from it
        raise RuntimeError(f"exporting needs torch >= 2.6 (torch.compiler.is_exporting); this is {torch.__version__}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    want_onnx = fmt in ("onnx", "both")
    if want_onnx and not onnx_available():
        raise ImportError("--format onnx needs onnx and onnxscript: pip install -e '.[onnx]'")
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
        program = torch.export.export(module, example_inputs(batch, canvas))
        # To the inference IR: also removes the autocast regions of post-processing, which the serialiser
        # cannot write next to the NMS loops.
        program = program.run_decompositions({})
    log.info("torch.export: %.1f s", time.perf_counter() - started)
    files, opset = {}, None
    if fmt in ("exported", "both"):
        files["exported"] = PROGRAM_FILE
        torch.export.save(program, os.path.join(out_dir, PROGRAM_FILE))
    if want_onnx:
        started = time.perf_counter()
        files["onnx"] = ONNX_FILE
        opset = to_onnx(program, os.path.join(out_dir, ONNX_FILE))
        log.info("ONNX (opset %d): %.1f s", opset, time.perf_counter() - started)
    spec = make_spec(cfg, batch=batch, category_ids=category_ids, names=names, files=files, weights=weights,
                     opset=opset)
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=1)
    return spec


# ----------------------------------------------------------------------------------------------------
# Timing


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


def time_export(cfg, weights: str, out_dir: str, iters: int, rounds: int = 3) -> dict[str, tuple[float, float]]:
    """Images/s of experiments.predict's eager step, the exported program and onnxruntime on one random batch
    of the export's shape (onnxruntime with as many threads as torch uses; see `_images_per_second`).

    Args:
      cfg: the config given to `export`; the eager step runs it on the export's canvas with its own
        model.test.static_shapes (same detections, see `export_config`).
      weights: the weights file given to `export`.
      out_dir: the export folder.
      iters: calls timed per runtime and round.
      rounds: rounds; the median is reported.

    Returns:
      {'eager' | 'exported' | 'onnxruntime': (images/s by the wall clock, images per CPU second)} for the
      runtimes present.
    """
    gc.collect()  # the export's graphs, so that collections during the timing do not walk them
    spec = read_spec(out_dir)
    eager_cfg = export_config(cfg, spec["canvas"])
    eager_cfg.model.test.static_shapes = bool(cfg.model.test.get("static_shapes", False))
    class_count.from_weights(eager_cfg, weights)
    params = tree.cast(load_detector_weights(weights, eager_cfg.model).params, torch.float32, "cpu")
    n, (h, w) = int(spec["batch"]), spec["canvas"]
    image = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    batch = {"image": image, "image_hw": torch.tensor([[h, w]] * n), "scale_factor": torch.ones(n, 2)}
    eval_step = make_eval_step(eager_cfg, device="cpu")
    calls = {"eager": lambda: eval_step(params, batch)}
    if "exported" in spec["files"]:
        run = load_program(out_dir, spec)
        calls["exported"] = lambda: run(batch)
    if "onnx" in spec["files"]:
        import onnxruntime  # noqa: PLC0415 - optional dependency (the onnx extra)

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch uses, for a like comparison
        session = onnxruntime.InferenceSession(os.path.join(out_dir, spec["files"]["onnx"]), options,
                                               providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in batch.items()}
        calls["onnxruntime"] = lambda: session.run(None, feed)
    return _images_per_second(calls, n, iters, rounds)


def define_flags() -> dict[str, Any]:
    """The command-line flags (defined only when run as a program), as {name: FlagHolder}."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                                  lock_config=True),
        "weights": flags.DEFINE_string("weights", None, "A retina_fn checkpoint, or torchvision / mmdetection "
                                                        "RetinaNet weights."),
        "out": flags.DEFINE_string("out", None, "Folder for model.pt2 / model.onnx and model.json."),
        "format": flags.DEFINE_enum("format", "both", list(FORMATS), "What to write: the torch.export program "
                                    "(.pt2), ONNX, or both."),
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
        rates = time_export(value["config"], value["weights"], value["out"], value["time"], value["rounds"])
        print(f"images/s on a {spec['canvas'][0]}x{spec['canvas'][1]} canvas, batch {spec['batch']}, "
              f"{torch.get_num_threads()} threads, median of {value['rounds']} rounds of {value['time']} calls "
              f"(wall clock / per CPU second): "
              + ", ".join(f"{k} {w:.2f} / {c:.2f}" for k, (w, c) in rates.items()))


if __name__ == "__main__":
    _holders = define_flags()
    flags.mark_flags_as_required(["config", "weights", "out"])
    app.run(lambda argv: main(argv, _holders))
