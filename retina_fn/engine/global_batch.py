"""The global batch is the one number a run keeps across restarts and resizes. The images of each step (the sampler's
plan), the steps per epoch and the learning-rate schedule are functions of it alone, and k accumulated loader
batches give the update of k times as many replicas (retina_fn.train.step). So a run fixes its global batch at its
first start (optim.global_batch, else images per device x processes x optim.accum_steps), stores it in every
checkpoint, and at each (re)start `plan` derives the accumulation for the processes present
(optim.accum_steps='auto') or checks the one given. A global batch those processes cannot divide is refused
before anything is written.
"""

from __future__ import annotations

from typing import NamedTuple

from retina_fn import errors

AUTO = "auto"
_LISTED = 8  # at most this many alternatives in a refusal


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
