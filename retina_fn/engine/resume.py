"""Where a run starts, and what a resumed or resized run keeps.

    prepare_data(cfg, runtime)                          # the dataset on disk (the synthetic one is generated)
    start = restore_or_init(cfg, workdir, key, optimizer, device, world_size)
    start.state, start.epoch, start.step_in_epoch, start.batch, start.segments

The global batch is the one number a run keeps across restarts and resizes. The images of each step (the sampler's
plan), the steps per epoch and the learning-rate schedule are functions of it alone, and k accumulated loader
batches give the update of k times as many replicas (retina_fn.train.step). So a run fixes its global batch at its
first start (optim.global_batch, else images per device x processes x optim.accum_steps), stores it in every
checkpoint, and at each (re)start `plan` derives the accumulation for the processes present
(optim.accum_steps='auto') or checks the one given. A global batch those processes cannot divide is refused
before anything is written.

A run's segments: each process lifetime of a run (a failure and a restart, a node lost or added) trains from one
step to another on its own number of processes. Every checkpoint stores the segments that led to it (its
metadata's 'segments'); a resumed run continues the list, and results.json reports the whole run. A segment
record (plain JSON): start_step, end_step (it trained (start_step, end_step]), world_size, accum_steps,
global_batch, train_s (the steps and the waits for their batches), wall_s (from the process's start of training
setup), measured_images, measured_s and images_per_s (the throughput meter's count: each epoch's steps after its
warm-up steps; 0.0 when no step was measured). Steps trained after the newest checkpoint and lost with the process
are in no segment: the next segment trains them again.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Sequence

import torch

from retina_fn import checkpoint, errors, rng, schema, tree
from retina_fn import spec as spec_lib
from retina_fn.data import synthetic
from retina_fn.model import retinanet
from retina_fn.optim import Optimizer
from retina_fn.spec import DetectorSpec
from retina_fn.train import StepSettings, init_train_state

log = logging.getLogger(__name__)

DATASETS = ("coco", "synthetic")
AUTO = "auto"
_LISTED = 8  # at most this many alternatives in a refusal


def prepare_data(cfg, runtime) -> None:
    """Makes sure the configured dataset is on disk.

    data.dataset 'coco': nothing to do (the loaders report missing files). 'synthetic': generates the
    shapes dataset under data.root on rank 0 when it is absent or incomplete (the other ranks wait); the
    config's data.train_ann / train_images / val_ann / val_images must name the generator's layout
    (configs/demo.py sets them), so a run reads exactly the files its config names.

    Raises:
      ValueError: an unknown data.dataset, or synthetic paths that are not the generator's layout.
    """
    if cfg.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {DATASETS}, got {cfg.data.dataset!r}")
    if cfg.data.dataset == "coco":
        return
    wrong = {k: cfg.data[k] for k, v in synthetic.LAYOUT.items() if cfg.data[k] != v}
    if wrong:
        fix = " ".join(f"--config.data.{k}={v}" for k, v in synthetic.LAYOUT.items())
        raise ValueError(f"data.dataset='synthetic' writes {dict(synthetic.LAYOUT)} under data.root, but the config "
                         f"names {wrong}; pass {fix}")
    s = cfg.data.synthetic
    if runtime.is_main:
        paths = synthetic.ensure_synthetic(cfg.data.root, s.num_train, s.num_val, s.seed, s.image_size, s.num_classes)
        log.info("synthetic dataset at %s\n%s", cfg.data.root, synthetic.format_summary(paths.summary))
    runtime.barrier()


def initial_params(spec: DetectorSpec, key: rng.Key, pretrained: str | None = None) -> dict:
    """Random init (retinanet.init from `key`), with the backbone from `pretrained` (a torchvision ResNet file,
    model.backbone.pretrained) when given. Returns the full parameter tree."""
    params = retinanet.init(key, spec)
    if pretrained:
        from retina_fn import interop

        state_dict = interop.load_state_dict(pretrained)
        params["backbone"] = interop.resnet_from_torchvision(state_dict, spec.backbone, source=pretrained)
        log.info("backbone initialised from %s", pretrained)
    return params


class BatchPlan(NamedTuple):
    """How this process group makes the run's global batch.

    Attributes:
      global_batch: images behind one optimiser step, over all processes.
      images_per_device: images in one loader batch of one process.
      world_size: processes present.
      accum_steps: loader batches each process accumulates into one step.
    """

    global_batch: int
    images_per_device: int
    world_size: int
    accum_steps: int


class GlobalBatchError(ValueError):
    """The processes present cannot make the run's global batch (a one-line message that names the counts and
    the settings that would)."""


def accum_setting(optim_cfg) -> int | str:
    """optim.accum_steps checked: an int >= 1, or 'auto'.

    Raises:
      ValueError: anything else.
    """
    value = optim_cfg.accum_steps
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"optim.accum_steps must be an int >= 1 or 'auto', got {value!r}")
    return value


def stored_global_batch(meta: dict, images_per_device: int) -> int:
    """The global batch a checkpoint was trained with (its metadata's 'global_batch'; checkpoints written before
    that field existed had no accumulation over loader batches: images per device x processes).

    Args:
      meta: a checkpoint's metadata.
      images_per_device: what to assume when an old checkpoint's stored config does not say.

    Returns:
      The global batch, an int.
    """
    if meta.get("global_batch") is not None:
        return int(meta["global_batch"])
    old_cfg = meta.get("config", {})
    return int(old_cfg.get("data", {}).get("images_per_device", images_per_device)) * int(meta.get("world_size", 1))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(values: list[int], around: int) -> list[int]:
    """Up to _LISTED of `values` closest to `around`, ascending."""
    return sorted(sorted(values, key=lambda v: (abs(v - around), v))[:_LISTED])


def alternatives(global_batch: int, images_per_device: int, world_size: int) -> str:
    """The settings that make `global_batch` (for a refusal message): process counts at this images per device,
    and images per device at this process count, each with its accumulation (at most 8 of each, those nearest
    the present setting).

    Args:
      global_batch: the images per step to make.
      images_per_device: the present data.images_per_device.
      world_size: the processes present.

    Returns:
      One clause, e.g. 'with 2 image(s) per device run 1, 3 or 9 process(es) (accum_steps 9, 3, 1); no images per
      device works with 2 processes'.
    """
    clauses = []
    if global_batch % images_per_device == 0:
        counts = _nearest(_divisors(global_batch // images_per_device), world_size)
        accums = ", ".join(str(global_batch // (images_per_device * w)) for w in counts)
        clauses.append(f"with {images_per_device} image(s) per device run {_or(counts)} process(es) (accum_steps "
                       f"{accums})")
    if global_batch % world_size == 0:
        sizes = _nearest(_divisors(global_batch // world_size), images_per_device)
        accums = ", ".join(str(global_batch // (d * world_size)) for d in sizes)
        clauses.append(f"with {world_size} process(es) set --config.data.images_per_device to {_or(sizes)} "
                       f"(accum_steps {accums})")
    else:
        clauses.append(f"no images per device works with {world_size} processes")
    return "; ".join(clauses)


def _or(values: list[int]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def plan(cfg, world_size: int, meta: dict | None = None, source: str | None = None) -> BatchPlan:
    """The global batch and accumulation of a (re)start with `world_size` processes.

    The global batch is the checkpoint's when resuming (`meta`), else optim.global_batch, else images per device
    x world_size x optim.accum_steps (1 for 'auto'). With optim.accum_steps='auto' the accumulation is
    global batch / (images per device x world_size); an int must give the global batch exactly.

    Args:
      cfg: the run's config (data.images_per_device, optim.accum_steps, optim.global_batch).
      world_size: the processes present.
      meta: the metadata of the checkpoint being resumed, None for a first start.
      source: what to call that checkpoint in messages (its path).

    Returns:
      BatchPlan.

    Raises:
      GlobalBatchError: the processes present cannot make the global batch, or the settings contradict it; one
        line naming the counts and what would work.
      ValueError: a malformed optim.accum_steps, optim.global_batch or data.images_per_device.
    """
    ipd = int(cfg.data.images_per_device)
    if ipd < 1:
        raise ValueError(f"data.images_per_device must be >= 1, got {ipd}")
    accum = accum_setting(cfg.optim)
    configured = cfg.optim.global_batch
    if configured is not None and int(configured) < 1:
        raise ValueError(f"optim.global_batch must be >= 1, got {configured}")
    if meta is not None:
        target = stored_global_batch(meta, ipd)
        origin = f"{source} was trained with a global batch of {target} images per step"
        if configured is not None and int(configured) != target:
            raise GlobalBatchError(f"{origin}, but optim.global_batch={configured}: a run keeps its global batch "
                                   f"(the data order and the schedule depend on it); leave optim.global_batch unset "
                                   f"or {target}, or start a new run in another workdir")
        origin += f" ({int(meta.get('world_size', 1))} process(es))"
    elif configured is not None:
        target, origin = int(configured), f"optim.global_batch={configured}"
    else:
        return BatchPlan(ipd * world_size * (1 if accum == AUTO else accum), ipd, world_size,
                         1 if accum == AUTO else accum)
    per_round = ipd * world_size
    if accum == AUTO:
        if target % per_round:
            raise GlobalBatchError(
                f"{origin}, which {world_size} process(es) x {ipd} image(s) per device cannot make ({target} is not "
                f"a multiple of {per_round}); {alternatives(target, ipd, world_size)}. Nothing was trained or "
                f"written")
        return BatchPlan(target, ipd, world_size, target // per_round)
    if per_round * accum != target:
        hint = (f"--config.optim.accum_steps={target // per_round} (or =auto)" if target % per_round == 0
                else f"{alternatives(target, ipd, world_size)}, with --config.optim.accum_steps=auto")
        raise GlobalBatchError(f"{origin}; this run has {per_round * accum} ({ipd} per device x {world_size} x "
                               f"optim.accum_steps={accum}). That would change the data order and the schedule; "
                               f"keep the global batch: {hint}")
    return BatchPlan(target, ipd, world_size, accum)


def _rate(images: float, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def record(*, start_step: int, end_step: int, world_size: int, accum_steps: int, global_batch: int, train_s: float,
           wall_s: float, measured_images: int, measured_s: float) -> dict:
    """One segment record (see the module docstring), with images_per_s derived."""
    return {"start_step": int(start_step), "end_step": int(end_step), "world_size": int(world_size),
            "accum_steps": int(accum_steps), "global_batch": int(global_batch), "train_s": float(train_s),
            "wall_s": float(wall_s), "measured_images": int(measured_images), "measured_s": float(measured_s),
            "images_per_s": _rate(measured_images, measured_s)}


def earlier_segments(meta: dict | None) -> list[dict]:
    """The segments stored in a checkpoint's metadata ([] for a first start or a checkpoint written before
    segments were stored).

    Args:
      meta: the resumed checkpoint's metadata, or None.

    Returns:
      list of segment records, oldest first.
    """
    return [dict(s) for s in (meta or {}).get("segments", [])]


def whole_run(segments: Sequence[dict]) -> dict:
    """The run's totals over its segments.

    Args:
      segments: segment records, oldest first (at least one).

    Returns:
      {'train_s': sum of train_s, 'wall_s': sum of wall_s, 'train_images_per_s': the sum of measured images over
      the sum of measured seconds (0.0 when nothing was measured), 'segments': len(segments)}.
    """
    images = sum(s["measured_images"] for s in segments)
    seconds = sum(s["measured_s"] for s in segments)
    return {"train_s": sum(s["train_s"] for s in segments), "wall_s": sum(s["wall_s"] for s in segments),
            "train_images_per_s": _rate(images, seconds), "segments": len(segments)}


def describe(segments: Sequence[dict]) -> str:
    """One line per segment for the log: steps, processes, accumulation, seconds, images/s."""
    def rate(s: dict) -> str:
        return f"{s['images_per_s']:.1f} img/s" if s["measured_s"] > 0 else "img/s not measured (warm-up steps only)"

    return "\n".join(f"  segment {i + 1}: steps {s['start_step']}..{s['end_step']} on {s['world_size']} process(es) "
                     f"x accum {s['accum_steps']} (global batch {s['global_batch']}): {s['train_s']:.1f} s training, "
                     f"{s['wall_s']:.1f} s wall, {rate(s)}" for i, s in enumerate(segments))


def check_same_detector(stored: DetectorSpec, configured: DetectorSpec, source: str, workdir: str) -> None:
    """Refuses to resume a run as another detector: every field of the spec but the memory format must be the
    checkpoint's (its parameters, its targets and its losses were made with those).

    Raises:
      ConfigError: naming each field that differs, the checkpoint's value and the config's.
    """
    differing = [(k, a, b) for k, a, b in spec_lib.differences(stored, configured) if k != "backbone.channels_last"]
    if differing:
        fields = "; ".join(f"--config.{spec_lib.config_path(k)}={b!r} (the checkpoint's {a!r})" for k, a, b in differing)
        raise errors.ConfigError(f"{workdir} holds a run of another detector: {source} was trained with other settings "
                                 f"than this config gives: {fields}. Resume with the run's own config, or start the new "
                                 f"one in another --workdir")


class StartingPoint(NamedTuple):
    """state: the train state on the device; epoch, step_in_epoch: where the data resumes; batch: the BatchPlan
    of this start; segments: the run's earlier segments, [] for a first start."""

    state: dict
    epoch: int
    step_in_epoch: int
    batch: BatchPlan
    segments: list


def restore_or_init(cfg, spec: DetectorSpec, settings: StepSettings, workdir: str, key: rng.Key,
                    optimizer: Optimizer, device: torch.device, world_size: int = 1) -> StartingPoint:
    """The newest usable checkpoint of workdir/checkpoints restored into a fresh state's structure, or the
    fresh state itself (from `initial_params`) when there is none, with the global batch and accumulation of
    `world_size` processes (`plan`: the checkpoint's global batch is kept).

    Raises:
      GlobalBatchError: the processes present cannot make the run's global batch; ConfigError: the checkpoint
        was trained as another detector (its stored spec differs from this config's). Both before anything is
        built or written.
    """
    restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"))
    meta = (restored.meta or {}) if restored is not None else None
    batch = plan(cfg, world_size, meta, restored.path if restored is not None else None)
    if meta and meta.get("spec"):
        check_same_detector(schema.spec_from_json(meta["spec"], restored.path), spec, restored.path, workdir)
    params = None if restored else initial_params(spec, key, cfg.model.backbone.pretrained)
    template = init_train_state(spec, settings, key, optimizer, params=params, device=device)
    if restored is None:
        return StartingPoint(template, 0, 0, batch, [])
    state = tree.cast(checkpoint.restore_into(restored.state, template, restored.path), device=device)
    position = restored.meta["data_position"]
    epoch, step_in_epoch = int(position["epoch"]), int(position["step_in_epoch"])
    log.info("resumed from %s at step %d (epoch %d, step %d of it), written by %d process(es); global batch %d = %d "
             "per device x %d process(es) x %d accumulated", restored.path, restored.step, epoch + 1, step_in_epoch,
             meta.get("world_size", 1), batch.global_batch, batch.images_per_device, batch.world_size,
             batch.accum_steps)
    return StartingPoint(state, epoch, step_in_epoch, batch, earlier_segments(meta))
