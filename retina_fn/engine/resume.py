"""Where a run starts, and what a resumed or resized run keeps.

    prepare_data(cfg, runtime)                          # the dataset on disk (the synthetic one is generated)
    start = restore_or_init(cfg, workdir, key, optimizer, device, world_size)
    start.state, start.epoch, start.step_in_epoch, start.batch, start.segments

The global batch and the accumulation for the processes present: retina_fn.engine.global_batch.

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
from retina_fn.engine.global_batch import BatchPlan, plan
from retina_fn.engine.hooks import config_json
from retina_fn.model import retinanet
from retina_fn.optim import Optimizer
from retina_fn.spec import DetectorSpec
from retina_fn.train import StepSettings, init_train_state

log = logging.getLogger(__name__)

DATASETS = ("coco", "synthetic")


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
