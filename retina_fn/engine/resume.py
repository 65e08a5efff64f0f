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

A resumed run goes on as the same run: the detector its checkpoint stores (`check_same_detector`) and the schedule
and optimiser of its stored config (SCHEDULE_FIELDS, `check_same_schedule`) must be this config's, or the start is
refused in one line naming the fields. The rest may change between starts (where the data lies, logging, checkpoint
cadence, train.max_steps, the number of processes).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Sequence

import torch

from retina_fn import checkpoint, errors, rng, schema, tree
from retina_fn import spec as spec_lib
from retina_fn.data import synthetic
from retina_fn.engine.hooks import config_json
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
      ConfigError (a ValueError): an unknown data.dataset, or synthetic paths that are not the generator's layout.
    """
    if cfg.data.dataset not in DATASETS:
        raise errors.ConfigError(f"--config.data.dataset={cfg.data.dataset!r}: must be one of {DATASETS}")
    if cfg.data.dataset == "coco":
        return
    wrong = {k: cfg.data[k] for k, v in synthetic.LAYOUT.items() if cfg.data[k] != v}
    if wrong:
        fix = " ".join(f"--config.data.{k}={v}" for k, v in synthetic.LAYOUT.items())
        raise errors.ConfigError(f"data.dataset='synthetic' writes {dict(synthetic.LAYOUT)} under data.root, but "
                                 f"the config names {wrong}; pass {fix}")
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


class GlobalBatchError(errors.ConfigError):
    """The processes present cannot make the run's global batch, or the settings contradict the checkpoint's (a
    one-line message that names the counts and the settings that would). A ConfigError, so a ValueError too."""


def accum_setting(optim_cfg) -> int | str:
    """optim.accum_steps checked: an int >= 1, or 'auto'.

    Raises:
      ConfigError (a ValueError): anything else, naming --config.optim.accum_steps.
    """
    value = optim_cfg.accum_steps
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.ConfigError(f"optim.accum_steps must be an int >= 1 or 'auto', got {value!r}")
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
      ConfigError (a ValueError): a malformed optim.accum_steps, optim.global_batch or data.images_per_device,
        naming the field.
    """
    ipd = cfg.data.images_per_device
    if isinstance(ipd, bool) or not isinstance(ipd, int) or ipd < 1:
        raise errors.ConfigError(f"--config.data.images_per_device={ipd!r}: must be an integer >= 1")
    accum = accum_setting(cfg.optim)
    configured = cfg.optim.global_batch
    if configured is not None and (isinstance(configured, bool) or not isinstance(configured, int) or configured < 1):
        raise errors.ConfigError(f"--config.optim.global_batch={configured!r}: must be an integer >= 1 (or None)")
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


def trained_by(meta: dict | None) -> str:
    """" (config 'smoke')": the name of the config a checkpoint's metadata stores ('' when none), for messages."""
    name = ((meta or {}).get("config") or {}).get("name")
    return f" (config {name!r})" if isinstance(name, str) and name else ""


def _resume_advice(workdir: str) -> str:
    return (f"Resume it with the config it was trained with (its copy: {os.path.join(workdir, 'config.json')}), or "
            f"pass a new --workdir, where this config starts fresh")


def check_same_detector(stored: DetectorSpec, configured: DetectorSpec, source: str, workdir: str,
                        meta: dict | None = None, config_name: str | None = None) -> None:
    """Refuses to resume a run as another detector: every field of the spec but the memory format must be the
    checkpoint's (its parameters, its targets and its losses were made with those).

    Args:
      stored, configured: the checkpoint's spec and this config's; source: the checkpoint file; workdir: the
        run's folder; meta: the checkpoint's metadata; config_name: this config's name (for the message).

    Raises:
      ConfigError: one line naming the checkpoint's config and each field that differs, with both values.
    """
    differing = [(k, a, b) for k, a, b in spec_lib.differences(stored, configured) if k != "backbone.channels_last"]
    if differing:
        fields = "; ".join(f"--config.{spec_lib.config_path(k)}={b!r} (the checkpoint's {a!r})"
                           for k, a, b in differing)
        named = f" ({config_name!r})" if config_name else ""
        raise errors.ConfigError(f"{workdir} holds a run of another detector: {source}{trained_by(meta)} was trained "
                                 f"with other settings than this config{named} gives: {fields}. "
                                 f"{_resume_advice(workdir)}")


# The fields the learning-rate schedule and the optimiser's state are made of: a resumed run that changed one
# would go on under another schedule than the one its steps so far followed.
SCHEDULE_FIELDS = ("optim.name", "optim.lr", "optim.base_lr", "optim.base_batch", "optim.schedule", "optim.epochs",
                   "optim.step_epochs", "optim.gamma", "optim.warmup_iters", "optim.warmup_ratio",
                   "train.performance_steps")


def _field(node, path: str):
    for part in path.split("."):
        node = node[part]
    return tuple(node) if isinstance(node, list) else node


def schedule_differences(stored_config: dict, config: dict) -> list[tuple[str, object, object]]:
    """[(path, stored value, this value)] for the SCHEDULE_FIELDS that differ between two configs as JSON data
    (a checkpoint's stored config, hooks.config_json); fields either lacks are skipped."""
    found = []
    for path in SCHEDULE_FIELDS:
        try:
            old, new = _field(stored_config, path), _field(config, path)
        except (KeyError, TypeError):
            continue
        if old != new:
            found.append((path, old, new))
    return found


def check_same_schedule(meta: dict, config: dict, source: str, workdir: str) -> None:
    """Refuses to resume a run under another learning-rate schedule or optimiser (more epochs for a finished run,
    another lr, warm-up or decay): the steps already taken followed the checkpoint's. train.max_steps may change.

    Args:
      meta: the checkpoint's metadata (one that stores no 'config' is not checked); config: this run's config as
        JSON data (hooks.config_json); source: the checkpoint file; workdir: the run's folder.

    Raises:
      ConfigError: one line naming each field that differs, with the checkpoint's value, and what to do.
    """
    stored = meta.get("config")
    differing = schedule_differences(stored, config) if isinstance(stored, dict) else []
    if differing:
        fields = "; ".join(f"--config.{k}={b!r} (the checkpoint's {a!r})" for k, a, b in differing)
        raise errors.ConfigError(
            f"{source}{trained_by(meta)} was trained under another schedule than this config gives: {fields}. "
            f"Resuming would go on under a new learning-rate schedule, so it is refused: to resume, keep the "
            f"checkpoint's values; to train with the new ones, pass a new --workdir (it starts fresh)")


def _restored_state(restored, template: dict, workdir: str, device) -> dict:
    """The checkpoint's train state in the structure of `template`; ConfigError (one line) when it does not fit."""
    try:
        state = checkpoint.restore_into(restored.state, template, restored.path)
    except ValueError as err:  # restore_into's report of missing, unexpected or mis-shaped leaves
        first = [line.strip() for line in str(err).splitlines()[1:4]]
        raise errors.ConfigError(f"{restored.path}{trained_by(restored.meta)} holds a train state this config does "
                                 f"not build ({'; '.join(first)}, ...). {_resume_advice(workdir)}") from err
    return tree.cast(state, device=device)


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
        was trained as another detector (its stored spec differs from this config's), under another schedule
        (`check_same_schedule`), or holds a train state this config does not build. All before anything is
        written.
    """
    restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"))
    meta = (restored.meta or {}) if restored is not None else None
    batch = plan(cfg, world_size, meta, restored.path if restored is not None else None)
    if meta and meta.get("spec"):
        check_same_detector(schema.spec_from_json(meta["spec"], restored.path), spec, restored.path, workdir, meta,
                            cfg.name)
    if meta:
        check_same_schedule(meta, config_json(cfg), restored.path, workdir)
    params = None if restored else initial_params(spec, key, cfg.model.backbone.pretrained)
    template = init_train_state(spec, settings, key, optimizer, params=params, device=device)
    if restored is None:
        return StartingPoint(template, 0, 0, batch, [])
    state = _restored_state(restored, template, workdir, device)
    position = restored.meta["data_position"]
    epoch, step_in_epoch = int(position["epoch"]), int(position["step_in_epoch"])
    log.info("resumed from %s at step %d (epoch %d, step %d of it), written by %d process(es); global batch %d = %d "
             "per device x %d process(es) x %d accumulated", restored.path, restored.step, epoch + 1, step_in_epoch,
             meta.get("world_size", 1), batch.global_batch, batch.images_per_device, batch.world_size,
             batch.accum_steps)
    return StartingPoint(state, epoch, step_in_epoch, batch, earlier_segments(meta))
