"""What one benchmark run measures: Options, their checks, and the named variants (config overrides)."""

from __future__ import annotations

from typing import Callable, NamedTuple

from configs import common
from experiments.cli import parse_canvas  # noqa: F401  (the benchmark's --canvas)
from retina_fn import errors

MODES = ("train", "infer", "data")
COMPARISONS = ("none", "torchvision")

# name -> (what it changes, {dotted config path: value})
VARIANTS: dict[str, tuple[str, dict]] = {
    "eager": ("nothing compiled or captured", {"train.compile": False, "train.cuda_graph": False}),
    "compile_step": ("the step compiled (train.compile)", {"train.compile": True}),
    "cuda_graph": ("the train step / eval forward as CUDA graphs (train.cuda_graph)", {"train.cuda_graph": True}),
    "nchw": ("contiguous NCHW activations", {"model.backbone.channels_last": False}),
    "channels_last": ("channels_last activations", {"model.backbone.channels_last": True}),
    "all_trainable": ("stem and layer1 trainable too", {"model.backbone.frozen_stages": -1}),
    "not_canvas_exact": ("no extent masks (model.canvas_exact=False)", {"model.canvas_exact": False}),
    "fused_focal": ("fused focal loss (model.loss.fused_focal)", {"model.loss.fused_focal": True}),
    "one_hot_focal": ("one-hot focal loss", {"model.loss.fused_focal": False}),
    "box_buckets": ("ground truth padded to a bucket of (8, 16, 32, 64)", {"data.box_buckets": (8, 16, 32, 64)}),
    "no_box_buckets": ("ground truth padded to data.max_boxes", {"data.box_buckets": ()}),
}


class Options(NamedTuple):
    """What to measure and how; the command-line flags of the same names (None: as the config says)."""

    mode: str = "train"
    batch: int | None = None  # images per step (data.images_per_device)
    canvas: tuple[int, int] | None = None  # (H, W) (data.landscape_canvas)
    precision: str | None = None  # train.precision
    compile: bool | None = None  # train.compile
    channels_last: bool | None = None  # model.backbone.channels_last
    iters: int = 10
    warmup: int = 2
    rounds: int = 1  # with a comparison or variants: alternate the subjects this many times
    threads: int | None = None
    peak_tflops: float | None = None
    compare: str = "none"
    device: str = "auto"  # retina_fn.parallel.backend.resolve_device's request
    count_flops: bool = True
    variants: tuple[str, ...] = ()  # keys of VARIANTS
    check_steps: int = 0  # compiled / graphed subjects: compare this many steps with the eager step
    profile_steps: int = 0  # profile this many calls of the first subject
    seed: int = 0
    image_size: int | None = None  # data: the stand-in JPEGs' base side (None: the canvas's long side)


def check_options(opts: Options, torchvision_importable: Callable[[], bool]) -> None:
    """Raises a ConfigError naming the flag at fault."""
    if opts.mode not in MODES:
        raise errors.ConfigError(f"--mode must be one of {MODES}, got {opts.mode!r}")
    if opts.compare not in COMPARISONS:
        raise errors.ConfigError(f"--compare must be one of {COMPARISONS}, got {opts.compare!r}")
    if opts.iters < 1 or opts.warmup < 0 or opts.rounds < 1 or opts.check_steps < 0 or opts.profile_steps < 0:
        raise errors.ConfigError(f"need --iters >= 1, --warmup >= 0, --rounds >= 1, --check-steps >= 0, --profile >= "
                                 f"0; got {opts.iters}, {opts.warmup}, {opts.rounds}, {opts.check_steps}, "
                                 f"{opts.profile_steps}")
    unknown = [name for name in opts.variants if name not in VARIANTS]
    if unknown:
        raise errors.ConfigError(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    if opts.compare == "torchvision" and not torchvision_importable():
        raise errors.ConfigError("--compare torchvision: torchvision is not installed in this environment")


def apply_options(cfg, opts: Options):
    """Writes the options that are config fields into cfg in place (None leaves a field); returns cfg."""
    if opts.batch is not None:
        cfg.data.images_per_device = cfg.data.eval_images_per_device = int(opts.batch)
    if opts.canvas is not None:
        h, w = opts.canvas
        cfg.data.landscape_canvas, cfg.data.portrait_canvas = (h, w), (w, h)
        cfg.data.scale = (max(h, w), min(h, w))  # images resized to fit the canvas
    if opts.precision is not None:
        cfg.train.precision, cfg.train.opt_level = opts.precision, None
    if opts.compile is not None:
        cfg.train.compile = bool(opts.compile)
    if opts.channels_last is not None:
        cfg.model.backbone.channels_last = bool(opts.channels_last)
    return cfg


def variant_config(cfg, name: str):
    """A copy of cfg with VARIANTS[name]'s overrides."""
    return common.override(cfg.copy_and_resolve_references(), **VARIANTS[name][1])
