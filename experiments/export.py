"""Exports RetinaNet's inference for deployment (retina_fn.export): a torch.export program (model.pt2) and, with
the `onnx` extra, an ONNX model (model.onnx), with model.json saying how to feed it and read it.

    python -m experiments.export --weights runs/demo/checkpoints/<newest>.pt --out exported/demo  # its own spec
    python -m experiments.export --weights retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth --out exported/r50
    python -m experiments.export --weights ckpt.pt --out exported/demo --format onnx --canvas 320x320 --time 20
    python -m experiments.predict --exported exported/demo --images a.jpg --out dets.json --draw vis/
    python experiments/onnx_predict.py exported/demo a.jpg        # numpy + Pillow + onnxruntime only
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from retina_fn import export as export_lib
from retina_fn.engine import reporting
from retina_fn.export import folder, timing


TORCH_INTERNAL_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


def define_flags() -> dict[str, Any]:
    """The command-line flags (defined only when run as a program), as {name: FlagHolder}."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py): needed for weights "
                                                  "that store no spec; with a checkpoint it must agree with it.",
                                                  lock_config=True),
        "use_config_for": flags.DEFINE_list("use_config_for", [], "Config fields to take from --config instead of "
                                            "the checkpoint's spec (e.g. data.scale), or 'all'."),
        "weights": flags.DEFINE_string("weights", None, "A retina_fn checkpoint, or torchvision / mmdetection "
                                                        "RetinaNet weights."),
        "out": flags.DEFINE_string("out", None, "Folder for model.pt2 / model.onnx and model.json."),
        "format": flags.DEFINE_enum("format", "auto", list(export_lib.FORMATS), "What to write: the torch.export "
                                    "program (.pt2), ONNX, or both; 'auto': the program, and ONNX when onnx is "
                                    "installed."),
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
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    value = {name: holder.value for name, holder in holders.items()}
    canvas = cli.parse_canvas(value["canvas"]) if value["canvas"] else None
    with warnings.catch_warnings():  # torch internals' deprecation notes, nothing the user can act on
        for message in TORCH_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        spec = export_lib.export(value["weights"], value["out"], config=value["config"],
                                 use_config_for=value["use_config_for"], fmt=value["format"], canvas_hw=canvas,
                                 batch=value["batch"])
    logging.getLogger(__name__).info("exported %s (canvas %dx%d, batch %d) to %s: %s", spec["name"], *spec["canvas"],
                                     spec["batch"], value["out"],
                                     ", ".join(sorted(spec["files"].values()) + [folder.SPEC_FILE]))
    if value["time"] > 0:
        rates = timing.time_export(value["weights"], value["out"], value["time"], value["rounds"], value["config"],
                                   value["use_config_for"])
        print(f"images/s on a {spec['canvas'][0]}x{spec['canvas'][1]} canvas, batch {spec['batch']}, "
              f"{torch.get_num_threads()} threads, median of {value['rounds']} rounds of {value['time']} calls "
              f"(wall clock / per CPU second): "
              + ", ".join(f"{k} {w:.2f} / {c:.2f}" for k, (w, c) in rates.items()))


if __name__ == "__main__":
    _holders = define_flags()
    flags.mark_flags_as_required(["weights", "out"])
    cli.run(lambda argv: main(argv, _holders))
