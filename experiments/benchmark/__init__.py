"""Speed of the train step, inference and the data pipeline on one device, optionally beside torchvision.

    python -m experiments.benchmark --config configs/torchvision_retinanet_v1.py --mode train \\
        --batch 2 --canvas 512x512 --iters 10 --warmup 2 --json runs/bench_train.json
    python -m experiments.benchmark --config configs/retinanet_r50_fpn_1x_coco.py --mode infer --compare torchvision ...
    python -m experiments.benchmark --config configs/demo.py --mode data --iters 50 --json runs/bench_data.json

Modes:
  train  the project's pure train step (make_train_step with its optimiser), on one synthetic static batch
         (retina_fn.data.random_batch);
  infer  the eval step: forward and post-processing (make_eval_step);
  data   the training loader of the config's dataset (synthetic JPEGs in a temporary directory when the
         configured dataset has no files), timed by retina_fn.data.throughput.measure.

--device auto|npu|cuda|cpu picks the device as training does (retina_fn.parallel.backend.resolve_device:
'auto' prefers an Ascend NPU, then CUDA, then the CPU). Every timed call ends with a device
synchronisation. Reported per model: median, p10 and p90 seconds per call, images/s from the median, the
first call's time (compilation and warm-up included), peak memory (CPU: the process's peak resident set,
reset before each model where Linux allows it; accelerators: max allocated), FLOPs per image counted by
torch.utils.flop_counter.FlopCounterMode (convolutions and matrix products; forward for infer, forward +
backward for train), the achieved TFLOP/s and, with --peak-tflops, the MFU.

--variants times our step again with one optimisation undone or one proposal applied (unfolded_bn, nchw,
channels_last, all_trainable, eager, compile_step, cuda_graph, sort_topk; see experiments.benchmark.variants) and
reports each one's speed-up of ours.

--compare torchvision measures torchvision's RetinaNet R50-FPN in the same process on the same batch,
precision and thread count, alternating with ours in --rounds rounds so that both see the same machine load:
train is model(images, targets) + backward + SGD step, infer is model.eval() forward with its post-processing.
Its layout (--tv-variant): 'pretrained' (default) is what retinanet_resnet50_fpn builds when given ImageNet
backbone weights (FrozenBatchNorm2d, stem and layer1 frozen), i.e. the setting of our configs;
'builder_defaults' is retinanet_resnet50_fpn(weights=None, weights_backbone=None): trainable BatchNorm2d and a
fully trainable backbone. Our config's classes, P6 source and canvas carry over (min_size/max_size keep the
canvas). For infer, both models get a zero classification bias (--dense-scores, default on), so every
(anchor, class) pair passes the 0.05 score threshold and post-processing works at full load, as for a model
early in training; with the prior-probability bias nothing would pass and NMS would see no boxes.

Modules: options (Options, flags' checks), measurement (timing, memory, FLOPs, machine), ours (our subjects),
variants, torchvision_ref, data_mode, report (table, JSON); the prepared suites: suite (running one), suite_plan
(rows, plans, the batch), suite_report (ratios, tables), worker (the compiled rows' process); __main__ holds the
command line.
"""

from __future__ import annotations

import torch

from retina_fn import class_count
from experiments.benchmark.data_mode import measure_data
from experiments.benchmark.measurement import (PeakMemory, Subject, count_flops, load_average, machine_info, measure,
                                               speedup)
from experiments.benchmark.options import COMPARISONS, MODES, Options, apply_options, check_options, parse_canvas
from experiments.benchmark.ours import ours_detect_share, ours_infer, ours_train
from experiments.benchmark.report import format_table, write_json
from experiments.benchmark.torchvision_ref import TV_VARIANTS, torchvision_available, tv_infer, tv_train
from experiments.benchmark.variants import VARIANTS, variant_setups
from retina_fn import precision as precision_lib
from retina_fn.data.random_batch import config_batch
from retina_fn.parallel import backend

__all__ = [
    "COMPARISONS", "MODES", "TV_VARIANTS", "VARIANTS", "Options", "PeakMemory", "Subject", "apply_options",
    "count_flops", "format_table", "machine_info", "measure", "measure_data", "parse_canvas", "run", "speedup",
    "ours_detect_share", "ours_infer", "ours_train", "torchvision_available", "tv_infer", "tv_train", "write_json",
]


def _device(name: str) -> torch.device:
    """--device's torch.device through retina_fn.parallel.backend, its errors naming the flag."""
    try:
        return backend.resolve_device(name).device
    except (ValueError, backend.DeviceUnavailable) as e:
        raise type(e)(f"--device {name!r}: {e}") from e


def run(cfg, opts: Options) -> dict:
    """Runs one benchmark (see the module docstring).

    Args:
      cfg: the whole config; the options that are config fields are written into it (in place).
      opts: what to measure and how.

    Returns:
      A JSON-ready dict: 'config', 'mode', 'batch', 'canvas', 'precision', 'compile', 'channels_last',
      'num_classes', 'iters', 'warmup', 'rounds', 'machine' and, for data, 'data' (measure_data); for
      train/infer, 'ours' (measure's entry; for infer with a 'breakdown' from ours_detect_share), 'variants'
      ({name: entry with 'doc' and 'speedup_of_ours'}), 'torchvision' (entry or None) and, with a
      comparison, 'ratio_images_per_s', 'speedup_vs_torchvision' and 'torchvision_version'.

    Raises:
      ValueError: bad options (check_options, parse errors), an unknown --device, or model.num_classes 'auto'
        in train/infer mode (random batches have no annotation file to count classes in);
      backend.DeviceUnavailable: the requested device kind is absent.
    """
    check_options(opts, VARIANTS, torchvision_available)
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    device = _device(opts.device)
    cfg = apply_options(cfg, opts)
    batch_size = int(cfg.data.images_per_device)
    canvas = tuple(cfg.data.landscape_canvas)
    result = {
        "config": cfg.name, "mode": opts.mode, "batch": batch_size, "canvas": list(canvas),
        "precision": precision_lib.precision_from_config(cfg.train).name, "compile": bool(cfg.train.compile),
        "channels_last": bool(cfg.model.backbone.channels_last), "num_classes": cfg.model.num_classes,
        "iters": opts.iters, "warmup": opts.warmup, "rounds": opts.rounds, "machine": machine_info(device),
    }
    if opts.mode == "data":
        result["data"] = measure_data(cfg, opts, batch_size)
        result["machine"]["load_avg_end"] = load_average()
        return result

    batch = config_batch(cfg, class_count.require_int(cfg, "experiments.benchmark (random batches)"), device,
                         seed=opts.seed)
    setups = variant_setups(cfg, opts.variants)
    if opts.mode == "train":
        subjects = [ours_train(c, batch, device, opts.seed, name, patch) for name, c, patch in setups]
        if opts.compare == "torchvision":
            subjects.append(tv_train(cfg, batch, opts, device))
    else:
        subjects = [ours_infer(c, batch, device, opts.dense_scores, opts.seed, name, patch)
                    for name, c, patch in setups]
        if opts.compare == "torchvision":
            subjects.append(tv_infer(cfg, batch, opts, device))
    measured = measure(subjects, batch_size, opts, device)
    result["ours"] = measured["ours"]
    result["variants"] = {name: dict(measured[f"ours-{name}"], doc=VARIANTS[name].doc,
                                     speedup_of_ours=speedup(measured["ours"], measured[f"ours-{name}"]))
                          for name in opts.variants}
    result["torchvision"] = measured.get("torchvision")
    if result["torchvision"] is not None:
        result["torchvision"]["variant"] = opts.tv_variant
        result["torchvision"]["channels_last"] = opts.tv_channels_last
        result["ratio_images_per_s"] = result["ours"]["images_per_s"] / result["torchvision"]["images_per_s"]
        result["speedup_vs_torchvision"] = speedup(measured["ours"], measured["torchvision"])
        result["torchvision_version"] = __import__("torchvision").__version__
    if opts.mode == "infer":
        result["ours"]["breakdown"] = ours_detect_share(cfg, batch, device, opts.dense_scores,
                                                        max(1, min(opts.iters, 3)), opts.seed)
    result["machine"]["load_avg_end"] = load_average()
    return result
