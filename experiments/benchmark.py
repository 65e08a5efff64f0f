"""Speed of the train step, inference and the data pipeline on one device, optionally beside torchvision.

    python -m experiments.benchmark --config configs/torchvision_retinanet_v1.py --mode train \\
        --batch 2 --canvas 512x512 --iters 10 --warmup 2 --json runs/bench_train.json
    python -m experiments.benchmark --config configs/retinanet_r50_fpn_1x_coco.py --mode infer --compare torchvision ...
    python -m experiments.benchmark --config configs/demo.py --mode data --iters 50 --json runs/bench_data.json

Modes:
  train  the project's pure train step (make_train_step with its optimiser), on one synthetic static batch;
  infer  the eval step: forward and post-processing (make_eval_step);
  data   the training loader of the config's dataset (synthetic JPEGs in a temporary directory when the
         configured dataset has no files), timed by retina_fn.data.throughput.measure.

Every timed call ends with a device synchronisation. Reported per model: median, p10 and p90 seconds per
call, images/s from the median, the first call's time (compilation and warm-up included), peak memory
(CPU: the process's peak resident set, reset before each model where Linux allows it; CUDA: max allocated),
FLOPs per image counted by torch.utils.flop_counter.FlopCounterMode (convolutions and matrix products;
forward for infer, forward + backward for train), the achieved TFLOP/s and, with --peak-tflops, the MFU.

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
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Callable, NamedTuple

import numpy as np
import torch

from retina_fn import precision as precision_lib
from retina_fn import postprocess, rng
from retina_fn.model import retinanet
from retina_fn.train import AnchorCache, full_params, init_train_state, make_eval_step, make_train_step

MODES = ("train", "infer", "data")
TV_VARIANTS = ("pretrained", "builder_defaults")


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
    rounds: int = 1  # with a comparison: alternate the two models this many times
    threads: int | None = None
    peak_tflops: float | None = None
    compare: str = "none"  # 'none' | 'torchvision'
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    dense_scores: bool = True
    tv_variant: str = "pretrained"
    tv_channels_last: bool = False
    count_flops: bool = True
    variants: tuple[str, ...] = ()  # our step with one optimisation undone or one proposal applied (_variants)
    seed: int = 0
    image_size: int | None = None  # data: synthetic JPEGs' base side (each side 0.78..1.25 x); None: canvas


def parse_canvas(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768) (H, W)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--canvas must be HxW with positive integers, e.g. 512x512; got {text!r}")
    return int(parts[0]), int(parts[1])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def apply_options(cfg, opts: Options):
    """Writes the options that are config fields into cfg (in place) and returns it."""
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


# ---- inputs ---------------------------------------------------------------------------------------------

def synthetic_batch(cfg, batch_size: int, canvas: tuple[int, int], device: torch.device, seed: int = 0) -> dict:
    """A static batch in docs/conventions.md's layout: normal noise images filling the canvas and 3..6 random
    boxes per image (side 32..256 px, random labels), padded to data.max_boxes."""
    gen = np.random.default_rng(seed)
    h, w = canvas
    g, gi = int(cfg.data.max_boxes), int(cfg.data.max_ignore_boxes)
    boxes = np.zeros((batch_size, g, 4), np.float32)
    labels = np.zeros((batch_size, g), np.int64)
    valid = np.zeros((batch_size, g), bool)
    for i in range(batch_size):  # host-side input construction, not model code
        n = min(g, int(gen.integers(3, 7)))
        size = gen.uniform(32, min(256, h, w), (n, 2))
        corner = gen.uniform(0, 1, (n, 2)) * (np.array([w, h]) - size)
        boxes[i, :n] = np.concatenate([corner, corner + size], axis=1)
        labels[i, :n] = gen.integers(0, cfg.model.num_classes, n)
        valid[i, :n] = True
    image = torch.from_numpy(gen.standard_normal((batch_size, 3, h, w), dtype=np.float32))
    batch = {
        "image": image,
        "image_hw": torch.tensor([[h, w]] * batch_size, dtype=torch.int64),
        "boxes": torch.from_numpy(boxes),
        "labels": torch.from_numpy(labels),
        "box_valid": torch.from_numpy(valid),
        "ignore_boxes": torch.zeros(batch_size, gi, 4),
        "ignore_valid": torch.zeros(batch_size, gi, dtype=torch.bool),
        "scale_factor": torch.ones(batch_size, 2),
        "orig_hw": torch.tensor([[h, w]] * batch_size, dtype=torch.int64),
        "image_id": torch.arange(batch_size, dtype=torch.int64),
    }
    return {k: v.to(device) for k, v in batch.items()}


# ---- measuring ------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of what runs between reset() and peak_mb(): max allocated on CUDA; on CPU the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs on Linux; otherwise getrusage's
    ru_maxrss, which never resets, so it covers everything that ran before too)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_peak"
        self._resettable = device.type != "cuda" and self._try_reset()
        if device.type != "cuda" and not self._resettable:
            self.kind = "cpu_ru_maxrss_process"

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakMemory._vm_hwm_kb() is not None
        except OSError:
            return False

    @staticmethod
    def _vm_hwm_kb() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            self._try_reset()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._resettable:
            return self._vm_hwm_kb() / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call of fn, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


class Subject(NamedTuple):
    """One thing to time: call() runs one step (its state kept in a closure); flops() runs one step under
    the FLOP counter (eager) and returns the count, or None when not counted."""

    name: str
    call: Callable[[], object]
    flops: Callable[[], int | None]


def _stats(times: list[float]) -> dict:
    ordered = sorted(times)
    pick = lambda q: float(np.quantile(ordered, q))  # noqa: E731
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9), "min": ordered[0],
            "max": ordered[-1], "mean": statistics.fmean(ordered), "n": len(ordered)}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(subjects: list[Subject], batch_size: int, opts: Options, device: torch.device) -> dict[str, dict]:
    """Warm-up calls of each subject, then `iters` timed calls of each, split into `rounds` blocks that
    alternate between the subjects (so slow drifts of a shared machine's load hit all of them alike).

    Per subject: step_s (median, p10, p90, min, max, mean over all timed calls), round_medians, images_per_s
    (from the median), first_call_s, peak_memory_mb, flops_per_image, achieved_tflops, mfu."""
    memory = PeakMemory(device)
    results = {}
    for s in subjects:
        memory.reset()
        warm = [_timed(s.call, device) for _ in range(opts.warmup)]
        results[s.name] = {"first_call_s": warm[0] if warm else None, "warmup_s": warm, "times": [],
                           "round_medians": [], "peak_memory_mb": memory.peak_mb(), "memory_kind": memory.kind}
    rounds = max(1, min(opts.rounds, opts.iters))
    for r in range(rounds):
        n = opts.iters // rounds + (1 if r < opts.iters % rounds else 0)
        for s in subjects:
            memory.reset()
            times = [_timed(s.call, device) for _ in range(n)]
            entry = results[s.name]
            entry["times"].extend(times)
            entry["round_medians"].append(statistics.median(times))
            entry["peak_memory_mb"] = max(entry["peak_memory_mb"], memory.peak_mb())
    for s in subjects:
        r = results[s.name]
        r["step_s"] = _stats(r["times"])
        r["images_per_s"] = batch_size / r["step_s"]["median"]
        flops = s.flops() if opts.count_flops else None
        r["flops_per_image"] = None if flops is None else flops / batch_size
        r["achieved_tflops"] = None if flops is None else flops / r["step_s"]["median"] / 1e12
        r["mfu"] = (r["achieved_tflops"] / opts.peak_tflops
                    if opts.peak_tflops and r["achieved_tflops"] is not None else None)
    return results


def speedup(ours: dict, other: dict) -> dict:
    """How many times faster `ours` ran than `other`: from the overall medians, and paired (the median over
    rounds of the ratio of the two round medians, which cancels load changes between rounds)."""
    paired = [o / u for u, o in zip(ours["round_medians"], other["round_medians"])]
    return {"from_medians": other["step_s"]["median"] / ours["step_s"]["median"],
            "paired": statistics.median(paired), "per_round": paired}


# ---- variants: our step with one optimisation undone (or a proposed one applied), timed beside the default --

@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _separate_conv_bn(conv, norm, x, cfg, stride=1, padding=0):
    """The backbone's conv + norm before BN folding: a conv, then the frozen BN as its own affine pass."""
    from retina_fn import nn

    y = nn.conv2d(conv, x, stride=stride, padding=padding)
    if "running_mean" in norm:
        return nn.frozen_batch_norm(norm, y, float(cfg.bn_eps))
    return nn.group_norm(norm, y, int(cfg.gn_groups))


def _set(*pairs):
    """A config edit setting each dotted path of `pairs` ((path, value), ...) in place."""
    def edit(cfg):
        for path, value in pairs:
            node = cfg
            *parents, leaf = path.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
    return edit


def _stable_sort_top_k(key: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]


def _sort_topk_patch():
    from retina_fn import postprocess

    return _patched(postprocess, "_top_sorted", _stable_sort_top_k)


class Variant(NamedTuple):
    """doc: what changes; edit_config: applied in place to a copy of the config; patch: a context active
    while the variant is built and called (another code path)."""

    doc: str
    edit_config: Callable = _set()
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _variants() -> dict[str, Variant]:
    from retina_fn.model import resnet

    no_compile = (("train.compile", False),)
    return {
        "unfolded_bn": Variant("frozen BN applied after each conv as a separate affine (before folding)",
                               patch=lambda: _patched(resnet, "_conv_norm", _separate_conv_bn)),
        "nchw": Variant("contiguous NCHW activations", _set(("model.backbone.channels_last", False))),
        "channels_last": Variant("channels_last activations", _set(("model.backbone.channels_last", True))),
        "all_trainable": Variant("stem and layer1 trainable too (frozen_stages=-1)",
                                 _set(("model.backbone.frozen_stages", -1))),
        "eager": Variant("no torch.compile at all", _set(*no_compile)),
        "compile_step": Variant("the whole step compiled (train.compile)",
                                _set(*no_compile, ("train.compile", True))),
        "sort_topk": Variant("post-processing's top-k by a full stable sort (before retina_fn.topk)",
                             patch=_sort_topk_patch),
    }


def _with_patch(patch, fn):
    def call():
        with patch():
            return fn()
    return call


# ---- our model ------------------------------------------------------------------------------------------

def ours_train(cfg, batch: dict, device: torch.device, seed: int = 0, name: str = "ours",
               patch=contextlib.nullcontext) -> Subject:
    """The pure train step (compiled as configured), stepping one state forward on every call."""
    batch_size = batch["image"].shape[0]
    with patch():
        state = {"s": init_train_state(cfg, rng.key(seed), device=device)}
        step = make_train_step(cfg, steps_per_epoch=1000, global_batch=batch_size, device=device)

    def call():
        state["s"], metrics = step(state["s"], batch, rng.key(seed))
        return metrics

    def flops():
        eager_cfg = cfg.copy_and_resolve_references()  # the FLOP counter's dispatch mode cannot enter compiled code
        eager_cfg.train.compile = False
        eager = make_train_step(eager_cfg, steps_per_epoch=1000, global_batch=batch_size, device=device)
        return count_flops(lambda: eager(state["s"], batch, rng.key(seed)))

    return Subject(name, _with_patch(patch, call), _with_patch(patch, flops))


def _dense_params(params: dict) -> dict:
    head = dict(params["head"])
    head["cls_logits"] = dict(head["cls_logits"], bias=torch.zeros_like(head["cls_logits"]["bias"]))
    return dict(params, head=head)


def ours_infer(cfg, batch: dict, device: torch.device, dense_scores: bool, seed: int = 0, name: str = "ours",
               patch=contextlib.nullcontext) -> Subject:
    """The eval step (forward + post-processing) on a fresh model; torch.compile'd when train.compile."""
    params = full_params(init_train_state(cfg, rng.key(seed), device=device))
    if dense_scores:
        params = _dense_params(params)
    with patch():
        eval_step = make_eval_step(cfg, device=device)
    timed = torch.compile(eval_step) if cfg.train.compile else eval_step
    return Subject(name, _with_patch(patch, lambda: timed(params, batch)),
                   _with_patch(patch, lambda: count_flops(lambda: eval_step(params, batch))))


def ours_detect_share(cfg, batch: dict, device: torch.device, dense_scores: bool, iters: int, seed: int = 0) -> dict:
    """Median seconds of the forward alone and of post-processing alone on its outputs (detect's share)."""
    params = full_params(init_train_state(cfg, rng.key(seed), device=device))
    if dense_scores:
        params = _dense_params(params)
    canvas = tuple(batch["image"].shape[-2:])
    cache = AnchorCache(cfg.model)
    prec = precision_lib.precision_from_config(cfg.train)

    @torch.no_grad()
    def forward():
        with precision_lib.autocast(prec, device.type):
            return retinanet.apply(params, batch["image"], cfg.model)

    logits, deltas = forward()

    @torch.no_grad()
    def detect():
        return postprocess.detect(logits, deltas, cache.get(canvas, device), cache.level_counts(canvas),
                                  batch["image_hw"], batch["scale_factor"], cfg.model.test, cfg.model.coder)

    detect()
    out = {name: statistics.median(_timed(fn, device) for _ in range(max(iters, 1)))
           for name, fn in (("forward_s", forward), ("detect_s", detect))}
    out["detect_share"] = out["detect_s"] / (out["detect_s"] + out["forward_s"])
    return out


# ---- torchvision ----------------------------------------------------------------------------------------

def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def torchvision_model(cfg, canvas: tuple[int, int], variant: str, device: torch.device, seed: int = 0):
    """torchvision's RetinaNet R50-FPN with our config's classes and P6 source, keeping `canvas` unresized."""
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if variant not in TV_VARIANTS:
        raise ValueError(f"--tv-variant must be one of {TV_VARIANTS}, got {variant!r}")
    if cfg.model.backbone.depth != 50:
        raise ValueError(f"--compare torchvision needs model.backbone.depth=50, got {cfg.model.backbone.depth}")
    torch.manual_seed(seed)  # torchvision's initialisers draw from the global generator
    sizes = dict(min_size=min(canvas), max_size=max(canvas))
    if variant == "builder_defaults":
        model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=cfg.model.num_classes, **sizes)
    else:
        # What retinanet_resnet50_fpn builds when handed ImageNet backbone weights, without loading any.
        body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
        trainable_layers = 5 - (int(cfg.model.backbone.frozen_stages) + 1)
        p6_in = 2048 if cfg.model.fpn.extra_source == "input" else 256
        backbone = _resnet_fpn_extractor(body, trainable_layers, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(p6_in, 256))
        model = RetinaNet(backbone, cfg.model.num_classes, **sizes)
    return model.to(device)


def _tv_inputs(batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
    images = list(batch["image"].unbind(0))
    targets = [{"boxes": b[v], "labels": lab[v]}
               for b, lab, v in zip(batch["boxes"], batch["labels"], batch["box_valid"])]
    return images, targets


def _tv_autocast(prec: precision_lib.Precision, device: torch.device):
    if prec.compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=prec.compute_dtype)


def tv_train(cfg, batch: dict, opts: Options, device: torch.device) -> Subject:
    """model(images, targets) + backward + torch.optim.SGD step (config's momentum and weight decay)."""
    model = torchvision_model(cfg, tuple(batch["image"].shape[-2:]), opts.tv_variant, device, opts.seed)
    if opts.tv_channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    prec = precision_lib.precision_from_config(cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.loss_scaling)
    images, targets = _tv_inputs(batch)

    def call():
        with _tv_autocast(prec, device):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    def flops():
        def forward_backward():
            with _tv_autocast(prec, device):
                loss = sum(model(images, targets).values())
            loss.backward()
        result = count_flops(forward_backward)
        optimizer.zero_grad(set_to_none=True)
        return result

    return Subject("torchvision", call, flops)


def tv_infer(cfg, batch: dict, opts: Options, device: torch.device) -> Subject:
    """model.eval() forward with torchvision's transform and post-processing (score 0.05, top 1000 per
    level, NMS 0.5, 300 detections per image)."""
    model = torchvision_model(cfg, tuple(batch["image"].shape[-2:]), opts.tv_variant, device, opts.seed)
    if opts.tv_channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    if opts.dense_scores:
        with torch.no_grad():
            model.head.classification_head.cls_logits.bias.zero_()
    prec = precision_lib.precision_from_config(cfg.train)
    images, _ = _tv_inputs(batch)

    @torch.no_grad()
    def call():
        with _tv_autocast(prec, device):
            return model(images)

    return Subject("torchvision", call, lambda: count_flops(call))


# ---- data -----------------------------------------------------------------------------------------------

def _dataset_files_present(data_cfg) -> bool:
    if data_cfg.dataset != "coco" or not data_cfg.root:
        return False
    return os.path.isfile(os.path.join(data_cfg.root, data_cfg.train_ann))


def measure_data(cfg, opts: Options, batch_size: int) -> dict:
    """Images/s of the config's training loader; synthetic JPEGs (about canvas-sized) stand in for a
    dataset whose files are absent, including data.dataset == 'synthetic'."""
    from retina_fn.data import coco, loader as data_loader, synthetic, throughput

    needed = (opts.warmup + opts.iters) * batch_size
    with tempfile.TemporaryDirectory(prefix="retina_bench_") as tmp:
        source = "configured dataset"
        if not _dataset_files_present(cfg.data):
            size = opts.image_size or (max(cfg.data.landscape_canvas) if opts.canvas is None else max(opts.canvas))
            # Twice the images needed: the group sampler drops incomplete per-aspect batches.
            count = 2 * needed + 2 * batch_size
            synthetic.generate_synthetic(tmp, count, 1, opts.seed, image_size=int(size), num_classes=5)
            cfg.data.root = tmp
            cfg.data.train_ann = "annotations/instances_train.json"
            cfg.data.train_images = "train"
            cfg.data.filter_empty_gt = False
            cfg.data.min_size = 0
            source = f"{count} synthetic JPEGs of about {size} px"
        if opts.canvas is not None:
            cfg.data.scale = (max(opts.canvas), min(opts.canvas))
        train_set = coco.load_split(cfg.data, "train")
        loader = data_loader.make_train_loader(cfg.data, train_set, rank=0, world_size=1, key=rng.key(opts.seed))
        result = throughput.measure(loader, num_batches=opts.iters, warmup=opts.warmup)
        steps_per_epoch = loader.steps_per_epoch
        del loader  # stops its workers before their files go
        result.update(source=source, workers=int(cfg.data.workers), steps_per_epoch=steps_per_epoch,
                      scale=tuple(cfg.data.scale), canvases=[tuple(cfg.data.landscape_canvas),
                                                            tuple(cfg.data.portrait_canvas)])
    return result


# ---- the whole run --------------------------------------------------------------------------------------

def _load_avg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def run(cfg, opts: Options) -> dict:
    """Runs one benchmark and returns its result as a JSON-ready dict (see the module docstring)."""
    if opts.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {opts.mode!r}")
    if opts.compare not in ("none", "torchvision"):
        raise ValueError(f"--compare must be 'none' or 'torchvision', got {opts.compare!r}")
    if opts.iters < 1 or opts.warmup < 0 or opts.rounds < 1:
        raise ValueError(f"need --iters >= 1, --warmup >= 0, --rounds >= 1; got {opts.iters}, {opts.warmup}, "
                         f"{opts.rounds}")
    known = _variants()
    unknown = [a for a in opts.variants if a not in known]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; known: {sorted(known)}")
    if opts.compare == "torchvision" and not torchvision_available():
        raise ValueError("--compare torchvision: torchvision does not import in this environment")
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    device = resolve_device(opts.device)
    cfg = apply_options(cfg, opts)
    batch_size = int(cfg.data.images_per_device)
    canvas = tuple(cfg.data.landscape_canvas)
    result = {
        "config": cfg.name, "mode": opts.mode, "batch": batch_size, "canvas": list(canvas),
        "precision": precision_lib.precision_from_config(cfg.train).name, "compile": bool(cfg.train.compile),
        "channels_last": bool(cfg.model.backbone.channels_last), "num_classes": int(cfg.model.num_classes),
        "iters": opts.iters, "warmup": opts.warmup, "rounds": opts.rounds, "machine": machine_info(device),
    }
    if opts.mode == "data":
        result["data"] = measure_data(cfg, opts, batch_size)
        result["machine"]["load_avg_end"] = _load_avg()
        return result

    batch = synthetic_batch(cfg, batch_size, canvas, device, opts.seed)
    variants = [("ours", cfg, contextlib.nullcontext)]
    for name in opts.variants:
        variant = known[name]
        variant_cfg = cfg.copy_and_resolve_references()
        variant.edit_config(variant_cfg)
        variants.append((f"ours-{name}", variant_cfg, variant.patch))
    if opts.mode == "train":
        subjects = [ours_train(c, batch, device, opts.seed, n, p) for n, c, p in variants]
        if opts.compare == "torchvision":
            subjects.append(tv_train(cfg, batch, opts, device))
    else:
        subjects = [ours_infer(c, batch, device, opts.dense_scores, opts.seed, n, p) for n, c, p in variants]
        if opts.compare == "torchvision":
            subjects.append(tv_infer(cfg, batch, opts, device))
    measured = measure(subjects, batch_size, opts, device)
    result["ours"] = measured["ours"]
    result["variants"] = {name: dict(measured[f"ours-{name}"], doc=known[name].doc,
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
    result["machine"]["load_avg_end"] = _load_avg()
    return result


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(result: dict) -> str:
    """A few readable lines for the terminal."""
    m = result["machine"]
    head = (f"{result['config']} | {result['mode']} | batch {result['batch']} | canvas "
            f"{result['canvas'][0]}x{result['canvas'][1]} | {result['precision']} | compile {result['compile']} | "
            f"channels_last {result['channels_last']} | {m['device']} {m.get('cpu', '')} | torch {m['torch']} | "
            f"{m['threads']} threads | load {m.get('load_avg_start')} -> {m.get('load_avg_end')}")
    if result["mode"] == "data":
        d = result["data"]
        return (head + f"\n  data loader: {d['images_per_s']:.1f} images/s ({d['batches']} batches, "
                f"{d['workers']} workers, first batch {d['first_batch_s']:.2f} s; {d['source']})")
    cols = f"  {'model':<12} {'img/s':>8} {'median s':>9} {'p10 s':>8} {'p90 s':>8} {'first s':>8} " \
           f"{'peak MB':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}"
    lines = [head, cols]
    rows = [("ours", result["ours"])] + [(f"-{n}", r) for n, r in result.get("variants", {}).items()]
    if result.get("torchvision"):
        rows.append(("torchvision", result["torchvision"]))
    for name, r in rows:
        s = r["step_s"]
        lines.append(f"  {name:<12} {r['images_per_s']:8.3f} {s['median']:9.3f} {s['p10']:8.3f} {s['p90']:8.3f} "
                     f"{_fmt(r['first_call_s'], '8.2f')} {r['peak_memory_mb']:8.0f} "
                     f"{_fmt(r['flops_per_image'], '10.1f', 1e-9)} {_fmt(r['achieved_tflops'], '8.4f')} "
                     f"{_fmt(r['mfu'], '6.1%')}")
    for name, r in result.get("variants", {}).items():
        sp = r["speedup_of_ours"]
        lines.append(f"  ours vs ours-{name} ({r['doc']}): {sp['from_medians']:.3f}x from medians, "
                     f"{sp['paired']:.3f}x paired by round")
    if "ratio_images_per_s" in result:
        sp = result["speedup_vs_torchvision"]
        lines.append(f"  ours / torchvision images/s: {sp['from_medians']:.3f}x from medians, "
                     f"{sp['paired']:.3f}x paired by round")
    b = result["ours"].get("breakdown")
    if b:
        lines.append(f"  ours: forward {b['forward_s']:.3f} s, post-processing {b['detect_s']:.3f} s "
                     f"({b['detect_share']:.1%} of inference)")
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)


def _main():
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                             lock_config=True)
    mode = flags.DEFINE_enum("mode", "train", list(MODES), "What to time.")
    batch = flags.DEFINE_integer("batch", None, "Images per step (default: data.images_per_device).")
    canvas = flags.DEFINE_string("canvas", None, "HxW canvas (default: data.landscape_canvas).")
    prec = flags.DEFINE_enum("precision", None, list(precision_lib.PRECISIONS), "Default: train.precision.")
    compile_ = flags.DEFINE_bool("compile", None, "torch.compile the step (sets train.compile; default: "
                                                  "as configured).")
    channels_last = flags.DEFINE_bool("channels-last", None, "Sets model.backbone.channels_last (default: as "
                                                             "configured).")
    iters = flags.DEFINE_integer("iters", 10, "Timed calls per model.")
    warmup = flags.DEFINE_integer("warmup", 2, "Untimed calls per model first (compilation happens here).")
    rounds = flags.DEFINE_integer("rounds", 1, "Alternate ours and torchvision this many times.")
    threads = flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: torch's choice).")
    peak = flags.DEFINE_float("peak-tflops", None, "The device's peak TFLOP/s at this precision, for MFU.")
    compare = flags.DEFINE_enum("compare", "none", ["none", "torchvision"], "Also measure torchvision.")
    device = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Where to run.")
    dense = flags.DEFINE_bool("dense-scores", True, "infer: zero classification bias so NMS works at full load.")
    tv_variant = flags.DEFINE_enum("tv-variant", "pretrained", list(TV_VARIANTS), "torchvision model layout.")
    tv_cl = flags.DEFINE_bool("tv-channels-last", False, "Run torchvision in channels_last too.")
    no_flops = flags.DEFINE_bool("skip-flops", False, "Do not count FLOPs (saves one step per model).")
    variants = flags.DEFINE_list("variants", [], "Also time these variants of our step (one optimisation undone "
                                                 "or a proposed one applied): unfolded_bn, nchw, channels_last, "
                                                 "all_trainable, eager, compile_step, sort_topk.")
    image_size = flags.DEFINE_integer("image-size", None, "data: base side of the stand-in synthetic JPEGs (each "
                                      "side uniform in 0.78..1.25 x it; default: the canvas's long side).")
    out = flags.DEFINE_string("json", None, "Write the result here.")

    def main(argv):
        del argv
        opts = Options(mode=mode.value, batch=batch.value, canvas=parse_canvas(canvas.value) if canvas.value else None,
                       precision=prec.value, compile=compile_.value, channels_last=channels_last.value,
                       iters=iters.value, warmup=warmup.value, rounds=rounds.value, threads=threads.value,
                       peak_tflops=peak.value, compare=compare.value, device=device.value, dense_scores=dense.value,
                       tv_variant=tv_variant.value, tv_channels_last=tv_cl.value, count_flops=not no_flops.value,
                       variants=tuple(variants.value), image_size=image_size.value)
        result = run(config.value, opts)
        print(format_table(result))
        if out.value:
            write_json(out.value, result)
            print(f"wrote {out.value}")

    flags.mark_flags_as_required(["config", "json"])
    app.run(main)


if __name__ == "__main__":
    _main()
