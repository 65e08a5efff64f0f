"""The pieces of the training loop that decide and count: when to log, check, save and stop; throughput;
the non-finite guard; checkpoint writes. Each is small and host-side; the loop in retina_fn.engine.trainer
strings them together.

Host reads of device values happen only where something must be decided on the host: at log steps, at
checkpoint steps and at the end of an epoch. Between them the device runs ahead of the host.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from typing import Any, NamedTuple

import torch

from retina_fn import checkpoint, errors
from retina_fn.engine import reporting

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive steps."""


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU): what a timing boundary needs."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize(device)


def host_scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d device tensors -> Python floats, in one transfer (one host sync)."""
    values = torch.stack([v.detach().float() for v in metrics.values()]).cpu().tolist()
    return dict(zip(metrics.keys(), values))


class Cadence:
    """Which steps log, save and end an epoch early, from the train config.

    Args:
      train_cfg: the `train` block (log_every, checkpoint_every_steps, max_steps, performance_steps).
      steps_per_epoch: loader batches per epoch.
    """

    def __init__(self, train_cfg, steps_per_epoch: int):
        self.log_every = int(train_cfg.log_every)
        self.checkpoint_every = train_cfg.checkpoint_every_steps
        self.max_steps = train_cfg.max_steps
        self.performance_steps = train_cfg.performance_steps
        self.steps_per_epoch = steps_per_epoch

    def log_now(self, step: int, step_in_epoch: int) -> bool:
        """Every log_every global steps and at the end of each epoch."""
        return step % self.log_every == 0 or step_in_epoch == self.steps_per_epoch

    def checkpoint_now(self, step: int) -> bool:
        """Every checkpoint_every_steps global steps (when set)."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0

    def reached_max_steps(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def epoch_cut_short(self, steps_this_epoch: int) -> bool:
        """The seed's --performance: each epoch stops after performance_steps steps."""
        return self.performance_steps is not None and steps_this_epoch >= self.performance_steps


class ThroughputMeter:
    """Training images per second, over whole epochs minus their first `warmup` steps (compilation and
    warm-up), with device synchronisation only at those two boundaries of each epoch.

    Args:
      images_per_step: images in one optimiser step over all replicas.
      device: synchronised at the boundaries.
      warmup: steps at the start of each epoch left out.
    """

    def __init__(self, images_per_step: int, device: torch.device, warmup: int = 2):
        self.images_per_step, self.device, self.warmup = images_per_step, device, warmup
        self.images, self.seconds = 0, 0.0
        self._start: float | None = None
        self._counted = 0

    def step_done(self, steps_this_epoch: int) -> None:
        """Call after each step with the steps done so far in this epoch (this run)."""
        if steps_this_epoch == self.warmup:
            synchronize(self.device)
            self._start, self._counted = time.perf_counter(), 0
        elif self._start is not None:
            self._counted += 1

    def epoch_done(self) -> None:
        """Closes the epoch's window (also call it when the run stops inside an epoch)."""
        if self._start is not None and self._counted:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._start
            self.images += self._counted * self.images_per_step
        self._start = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def measured(self) -> tuple[int, float]:
        """(images, seconds) counted so far, the open epoch's window included up to now (which synchronises the
        device when that window has counted steps)."""
        images, seconds = self.images, self.seconds
        if self._start is not None and self._counted:
            synchronize(self.device)
            images += self._counted * self.images_per_step
            seconds += time.perf_counter() - self._start
        return images, seconds


class NonFiniteGuard:
    """Stops the run once `max_streak` consecutive steps were skipped for non-finite values.

    The step counts the streak on the device (state['nonfinite']); the guard reads it only when the loop
    is at a log or checkpoint step or an epoch's end, so a run that diverges stops at the next of those.
    """

    def __init__(self, max_streak: int, workdir: str):
        self.max_streak, self.workdir = int(max_streak), workdir

    def check(self, streak: int, step: int, metrics: dict[str, torch.Tensor], batches) -> None:
        """Warns about a running streak; raises NonFiniteLoss once it reaches max_streak.

        Args:
          streak: state['nonfinite'] read on the host; step: the global step; metrics: the step's metrics;
          batches: the last step's batch or tuple of loader batches (their image ids are named).
        """
        if not streak:
            return
        batches = batches if isinstance(batches, tuple) else (batches,)
        image_ids = [i for b in batches for i in b["image_id"].tolist()]
        scalars = host_scalars(metrics)
        bad = " and ".join(k for k in ("loss_cls", "loss_box") if not torch.isfinite(torch.tensor(scalars[k])))
        what = bad or "gradient"
        log.warning("step %d: non-finite %s (image ids %s); update skipped (%d in a row)", step, what, image_ids,
                    streak)
        if streak >= self.max_streak:
            raise NonFiniteLoss(
                f"{streak} consecutive non-finite steps (last: {what} on image ids {image_ids}); stopping. The last "
                f"checkpoint in {self.workdir}/checkpoints is intact: --config.optim.clip_norm=10 resumes from it; a "
                f"lower --config.optim.lr or a longer warmup changes the schedule, so it starts in a new --workdir.")


class Timed(NamedTuple):
    """What the training clock decided after a step, the same on every rank: save a checkpoint
    (train.checkpoint_every_s), stop training (train.time_budget_s)."""

    save: bool
    stop: bool


class TimedDecisions:
    """Decisions by the training clock: a checkpoint once train.checkpoint_every_s seconds of training have passed
    since the last one (so the work a failure can lose is bounded in time), and the end of training once
    train.time_budget_s seconds of training have passed; every rank acts on them at the same step.

    Clocks differ between ranks, so rank 0's decides and the others follow. Deciding costs a broadcast from
    rank 0, so with several processes it happens only at decision steps that rank 0 schedules from its own
    step time: about CHECKS_PER_INTERVAL per interval (at most every_s / CHECKS_PER_INTERVAL seconds apart, and
    at the step where the interval or the budget is expected to end). Between them a step pays nothing: no
    collective, no host read. A decision lands at most one decision gap late when the step time is steady. With
    one process every step is a decision step (a clock read).

    Args:
      every_s: seconds of training between checkpoints; None: no timed checkpoints.
      budget_s: seconds of training before stopping; None: no budget.
      runtime: the distribution runtime (is_main, world_size, broadcast_object).
      step: the global step training starts from.
      train_s: the run's training clock at that step.
    """

    CHECKS_PER_INTERVAL = 20

    def __init__(self, every_s: float | None, budget_s: float | None, runtime, step: int, train_s: float):
        for name, value in (("train.checkpoint_every_s", every_s), ("train.time_budget_s", budget_s)):
            if value is not None and not value > 0:
                raise errors.ConfigError(f"--config.{name}={value!r}: must be > 0 seconds (or None)")
        self.every_s, self.budget_s, self.runtime = every_s, budget_s, runtime
        self.next_check = step + 1
        self._saved_at = train_s  # the training clock at the last checkpoint (or the start)
        self._mark = (step, train_s)  # where rank 0's step-time estimate starts

    def due(self, step: int, train_s: float) -> Timed:
        """What to do after `step`, the same answer on every rank. Call it after every step on every rank; at
        decision steps it is a collective.

        Args:
          step: the global step just taken; train_s: this rank's training clock (only rank 0's is read).
        """
        if (self.every_s is None and self.budget_s is None) or step < self.next_check:
            return Timed(False, False)
        decision = self._decide(step, train_s) if self.runtime.is_main else None
        save, stop, self.next_check = self.runtime.broadcast_object(decision)
        return Timed(save, stop)

    def _decide(self, step: int, train_s: float) -> tuple[bool, bool, int]:
        """Rank 0: (save now, stop now, the next decision step)."""
        elapsed = train_s - self._saved_at
        save = self.every_s is not None and elapsed >= self.every_s
        stop = self.budget_s is not None and train_s >= self.budget_s
        if self.runtime.world_size == 1:
            return save, stop, step + 1
        step_s = (train_s - self._mark[1]) / max(step - self._mark[0], 1)
        self._mark = (step, train_s)
        gaps = []
        if self.every_s is not None:
            gaps += [self.every_s if save else self.every_s - elapsed, self.every_s / self.CHECKS_PER_INTERVAL]
        if self.budget_s is not None and not stop:
            gaps += [self.budget_s - train_s, self.budget_s / self.CHECKS_PER_INTERVAL]
        gap_s = min(gaps) if gaps else 0.0
        return save, stop, step + max(1, int(gap_s / max(step_s, 1e-9)))

    def saved(self, train_s: float) -> None:
        """Restarts the interval: a checkpoint (for any reason) was written at training clock `train_s`."""
        self._saved_at = train_s


def config_json(cfg) -> dict:
    """The config as plain JSON data (what checkpoints and config.json store)."""
    return json.loads(cfg.to_json_best_effort())


class Checkpointer:
    """Writes the run's checkpoints (rank 0; every rank waits for it) with the data position beside them.

    Args:
      cfg: the whole config (stored in each checkpoint's metadata; train.keep_checkpoints).
      spec: the detector's spec (stored: prediction, evaluation and export take the detector back from it, its
        label map included).
      workdir: checkpoints go to workdir/checkpoints.
      runtime: the distribution runtime (is_main, world_size, barrier).
      batch: the run's retina_fn.engine.global_batch.BatchPlan (its global batch is stored: the run's invariant).
    """

    def __init__(self, cfg, spec, workdir: str, runtime, batch):
        self.cfg, self.spec, self.runtime, self.batch = cfg, spec, runtime, batch
        self.directory = os.path.join(workdir, "checkpoints")
        self.saved_step = -1

    def save(self, state: dict, step: int, epoch: int, step_in_epoch: int, segments: list | None = None) -> None:
        """Saves `state` as global step `step`, to resume at (epoch, step_in_epoch), with the run's segments up to
        this step (retina_fn.engine.resume; read on rank 0 only)."""
        if self.runtime.is_main:
            meta = {"config": config_json(self.cfg), "spec": self.spec.to_json(),
                    "data_position": {"epoch": epoch, "step_in_epoch": step_in_epoch},
                    "world_size": self.runtime.world_size, "global_batch": self.batch.global_batch,
                    "accum_steps": self.batch.accum_steps, "segments": list(segments or [])}
            path = checkpoint.save(self.directory, step, state, meta, keep=self.cfg.train.keep_checkpoints)
            log.info("checkpoint %s", path)
        self.runtime.barrier()
        self.saved_step = step


METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, which needs the optional tensorboard package.

    Returns:
      The SummaryWriter class.

    Raises:
      ImportError: tensorboard is not installed (the message says how to install it or turn it off).
    """
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError("train.tensorboard=True needs the tensorboard package: pip install tensorboard (or the "
                          "project's [tensorboard] extra), or set --config.train.tensorboard=False; metrics.jsonl "
                          "is written either way")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class TensorBoardScalars:
    """Each metrics record's numbers as TensorBoard scalars: tag '<kind>/<field>' (e.g. 'train/loss_cls',
    'train/lr', 'train/images_per_s', 'eval/bbox_mAP') at the record's global step. The event file is opened
    at the first record (so a process that writes none leaves none) and flushed after every record.

    Args:
      log_dir: the folder of the event files.
    """

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer_class = summary_writer_class()  # fails at the start of a run, not at its first log step
        self._writer = None

    def write(self, record: dict[str, Any]) -> None:
        """Adds every int or float field of `record` but 'step' (bools and strings are skipped).

        Args:
          record: a metrics record with 'kind' ('train' or 'eval') and 'step' (the global step).
        """
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.log_dir)
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{record['kind']}/{key}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MetricsLog:
    """The run's metrics records: workdir/metrics.jsonl, the source of truth (the curves are read back from it),
    and with train.tensorboard=True the same records as TensorBoard scalars under workdir/tensorboard.

    Args:
      workdir: the run's folder.
      tensorboard: also write TensorBoard scalars (raises ImportError at once when tensorboard is missing).
    """

    def __init__(self, workdir: str, tensorboard: bool = False):
        self.jsonl = reporting.JsonlWriter(os.path.join(workdir, METRICS_FILE))
        self.tensorboard = TensorBoardScalars(os.path.join(workdir, TENSORBOARD_DIR)) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        """Appends `record` (with 'kind' and 'step') to the JSONL file, then to TensorBoard when enabled."""
        self.jsonl.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def read(self) -> list[dict[str, Any]]:
        """Every record of the JSONL file, in order."""
        return self.jsonl.read()

    def close(self) -> None:
        """Closes the TensorBoard event file (the JSONL file is opened per record)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
