"""What one benchmark run measures and how: the Options record, its checks, and the options that are config fields."""

from __future__ import annotations

from typing import Callable, Collection, NamedTuple

from retina_fn import errors

MODES = ("train", "infer", "data")
COMPARISONS = ("none", "torchvision")


class Options(NamedTuple):
    """What to measure and how; the command-line flags of the same names."""

    mode: str = "train"
    batch: int | None = None  # images per step; None: data.images_per_device
    canvas: tuple[int, int] | None = None  # (H, W); None: data.landscape_canvas
    precision: str | None = None  # None: train.precision
    compile: bool | None = None  # None: train.compile as configured
    channels_last: bool | None = None  # None: model.backbone.channels_last as configured
    iters: int = 10
    warmup: int = 2
    rounds: int = 1  # with a comparison: alternate the models this many times
    threads: int | None = None
    peak_tflops: float | None = None
    compare: str = "none"  # 'none' | 'torchvision'
    device: str = "auto"  # 'auto' | 'npu' | 'cuda' | 'cpu' (retina_fn.parallel.backend.resolve_device)
    dense_scores: bool = True
    tv_variant: str = "pretrained"
    tv_channels_last: bool = False
    count_flops: bool = True
    variants: tuple[str, ...] = ()  # names in benchmark.variants.VARIANTS
    seed: int = 0
    image_size: int | None = None  # data: synthetic JPEGs' base side (each side 0.78..1.25 x); None: canvas


def parse_canvas(text: str) -> tuple[int, int]:
    """Reads a --canvas value.

    Args:
      text: 'HxW' with positive integers, e.g. '512x768'.

    Returns:
      (H, W), e.g. (512, 768).

    Raises:
      ConfigError (a ValueError): naming --canvas, when the text is not of that form.
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise errors.ConfigError(f"--canvas must be HxW with positive integers, e.g. 512x512; got {text!r}")
    return int(parts[0]), int(parts[1])


def check_options(opts: Options, known_variants: Collection[str], torchvision_importable: Callable[[], bool]) -> None:
    """Rejects options that cannot run, naming the flag at fault.

    Args:
      opts: the options to check.
      known_variants: the variant names that exist.
      torchvision_importable: says whether `import torchvision` works here; asked only for --compare
        torchvision.

    Returns:
      None.

    Raises:
      ConfigError (a ValueError): an unknown mode, comparison or variant, non-positive iterations or rounds, a
        negative warm-up, or a torchvision comparison without torchvision.
    """
    if opts.mode not in MODES:
        raise errors.ConfigError(f"--mode must be one of {MODES}, got {opts.mode!r}")
    if opts.compare not in COMPARISONS:
        raise errors.ConfigError(f"--compare must be one of {COMPARISONS}, got {opts.compare!r}")
    if opts.iters < 1 or opts.warmup < 0 or opts.rounds < 1:
        raise errors.ConfigError(f"need --iters >= 1, --warmup >= 0, --rounds >= 1; got {opts.iters}, "
                                 f"{opts.warmup}, {opts.rounds}")
    unknown = [name for name in opts.variants if name not in known_variants]
    if unknown:
        raise errors.ConfigError(f"--variants: unknown {unknown}; known: {sorted(known_variants)}")
    if opts.compare == "torchvision" and not torchvision_importable():
        raise errors.ConfigError("--compare torchvision: torchvision does not import in this environment")


def apply_options(cfg, opts: Options):
    """Writes the options that are config fields into the config.

    Args:
      cfg: the whole config, edited in place (batch sizes, canvases, precision, compile, channels_last).
      opts: the options; None fields leave the config's value.

    Returns:
      cfg.
    """
    if opts.batch is not None:
        cfg.data.images_per_device = int(opts.batch)
        cfg.data.eval_images_per_device = int(opts.batch)
    if opts.canvas is not None:
        h, w = opts.canvas
        cfg.data.landscape_canvas = (h, w)
        cfg.data.portrait_canvas = (w, h)
    if opts.precision is not None:
        cfg.train.precision = opts.precision
        cfg.train.opt_level = None
    if opts.compile is not None:
        cfg.train.compile = bool(opts.compile)
    if opts.channels_last is not None:
        cfg.model.backbone.channels_last = bool(opts.channels_last)
    return cfg
