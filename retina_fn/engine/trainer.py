"""The training loop: data, state, the pure step, logging, checkpoints, evaluation, results.

    train_and_evaluate(cfg, workdir)   # what `python -m experiments.coco_retinanet` runs
    evaluate_only(cfg, workdir, weights)

Everything stateful lives here (files, the process group, the clock); the step it drives is pure. Rank 0
alone logs and writes files; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from retina_fn import checkpoint, class_count, errors, parallel, rng, schema, tree, trained
from retina_fn.engine import evaluation, host_memory, hooks, reporting, resume
from retina_fn.data import coco, loader as data_loader
from retina_fn.interop.weights import from_state_dict, read_weights
from retina_fn.parallel.backend import DeviceUnavailable
from retina_fn.train import build_optimizer, full_params, make_eval_step, make_train_step

log = logging.getLogger(__name__)


NonFiniteLoss = hooks.NonFiniteLoss


def train_and_evaluate(cfg, workdir: str) -> dict[str, Any]:
    """Trains cfg on its dataset, evaluating every train.eval_every_epochs epochs, resuming from the
    workdir's newest usable checkpoint. Returns the final results (rank 0; {} elsewhere). An 'auto'
    model.num_classes is set in cfg to the training annotation file's category count.

    Raises:
      ConfigError and the other retina_fn.errors: a user's mistake, before anything is trained.
      RunInterrupted: Ctrl-C (SIGINT); its message names the checkpoint the same command resumes from.
    """
    wall_start = time.perf_counter()
    schema.check_config(cfg)  # every field, before anything is started or written
    runtime = init_runtime(cfg.dist)
    device = runtime.device
    host_memory.keep_freed_memory(device)  # a CPU step reuses its freed buffers instead of faulting them in again
    try:
        return _train(cfg, workdir, runtime, device, wall_start)
    except KeyboardInterrupt as err:
        raise errors.RunInterrupted(interrupted_message(workdir)) from err
    finally:
        runtime.shutdown()


def init_runtime(dist_cfg):
    """retina_fn.parallel.init(dist_cfg), with a device that cannot be used here reported as the config's mistake.

    Raises:
      ConfigError: dist.device names a device kind this process cannot use (no such device, or its torch
        extension missing).
    """
    try:
        return parallel.init(dist_cfg)
    except DeviceUnavailable as err:
        text = str(err)
        if not text.startswith("dist.device="):
            text = f"dist.device={dist_cfg.device!r}: {text}"
        raise errors.ConfigError(f"--config.{text}") from err


def interrupted_message(workdir: str) -> str:
    """What Ctrl-C during training leaves: the newest checkpoint in workdir/checkpoints, which the same command
    resumes from, or that there is none yet.

    Args:
      workdir: the run's folder.

    Returns:
      One line of text (no 'interrupted:' prefix).
    """
    found = checkpoint.list_checkpoints(os.path.join(workdir, "checkpoints"))
    if not found:
        return (f"training stopped before its first checkpoint: nothing of it is kept in {workdir}; the same command "
                f"starts it again")
    step = int(os.path.basename(found[0])[len("ckpt_"):-len(".pt")])
    return (f"training stopped; the newest checkpoint is {found[0]} (step {step}): the same command resumes from it "
            f"(steps after it are trained again)")


class _Run:
    """Everything one training run holds: the data, the steps, the hooks, and the host-side counters."""

    def __init__(self, cfg, workdir: str, runtime, wall_start: float):
        self.cfg, self.workdir, self.runtime, self.device = cfg, workdir, runtime, runtime.device
        self.wall_start = wall_start
        os.makedirs(workdir, exist_ok=True)
        # first: a missing tensorboard (train.tensorboard=True) stops the run here; nothing is written until a record
        self.metrics_log = hooks.MetricsLog(workdir, tensorboard=cfg.train.tensorboard)
        resume.prepare_data(cfg, runtime)
        self.train_set = coco.load_split(cfg.data, "train")
        self.val_set = coco.load_split(cfg.data, "val") if cfg.train.validate else None
        class_count.from_training_set(cfg, self.train_set)  # model.num_classes 'auto' -> the file's count
        if self.val_set is not None:
            class_count.check_same_categories(self.train_set, self.val_set)
        labels = self.train_set.label_map
        self.spec = schema.detector_spec(cfg, labels.category_ids, labels.names)
        self.settings = schema.step_settings(cfg)

        model_key, data_key = rng.split(rng.key(cfg.seed))
        optimizer = build_optimizer(self.settings)  # one object: the state's optimiser state and the step's update
        # Refuses a global batch the processes present cannot make, before anything of this start is written.
        start = resume.restore_or_init(cfg, self.spec, self.settings, workdir, model_key, optimizer, self.device,
                                       runtime.world_size)
        self.start_epoch, self.start_step, self.batch = start.epoch, start.step_in_epoch, start.batch
        if runtime.is_main:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
        self.state = runtime.broadcast_tree(start.state)
        runtime.verify_same(self.state["params"])
        self.step = int(self.state["step"])  # a host copy: the step adds exactly 1 per call, no device read needed
        self.first_step, self.earlier_segments = self.step, start.segments

        self.pin = data_loader.pin_memory_for(self.device)
        self.accum_steps = self.batch.accum_steps
        self.loader = data_loader.make_train_loader(cfg.data, self.train_set, rank=runtime.rank,
                                                    world_size=runtime.world_size, key=data_key,
                                                    start_epoch=self.start_epoch, start_step=self.start_step,
                                                    pin_memory=self.pin, accum_steps=self.accum_steps,
                                                    local_processes=runtime.env.local_world_size)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.images_per_step = self.batch.global_batch
        if self.steps_per_epoch == 0:
            raise errors.ConfigError(
                f"{self.train_set.ann_file}: {len(self.train_set)} training images (after data.filter_empty_gt and "
                f"data.min_size) are too few for one global batch of {self.images_per_step} (--config.data."
                f"images_per_device={cfg.data.images_per_device} x {runtime.world_size} process(es) x "
                f"{self.batch.accum_steps} accumulated): lower --config.data.images_per_device or add images")
        if self.start_step >= self.steps_per_epoch:  # saved at an epoch's last step: the next epoch starts
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        # The schedule's epochs are the epochs this run takes: train.performance_steps cuts each one short.
        schedule_epoch = min(self.steps_per_epoch, cfg.train.performance_steps or self.steps_per_epoch)
        self.train_step = make_train_step(self.spec, self.settings, optimizer, steps_per_epoch=schedule_epoch,
                                          global_batch=self.images_per_step,
                                          reduce=runtime.reduce_mean if runtime.world_size > 1 else None,
                                          device=self.device)
        self.eval_step = make_eval_step(self.spec, self.device, precision_name=self.settings.precision,
                                        cuda_graph=self.settings.cuda_graph)
        self.epochs = int(cfg.optim.epochs)
        self.cadence = hooks.Cadence(cfg.train, self.steps_per_epoch)
        self.meter = hooks.ThroughputMeter(self.images_per_step, self.device)
        self.guard = hooks.NonFiniteGuard(cfg.train.max_nonfinite_steps, workdir)
        self.saver = hooks.Checkpointer(cfg, self.spec, workdir, runtime, self.batch)
        self.window = _Window()
        self.last_metrics: dict = {}
        self.train_clock = 0.0  # seconds of training in this segment (the steps and their batches' waits)
        self.timed = hooks.TimedDecisions(cfg.train.checkpoint_every_s, cfg.train.time_budget_s, runtime, self.step,
                                          0.0)
        self.evaluated: evaluation.EvalRun | None = None  # the newest evaluation (rank 0)
        log.info("%s | %s | %d train images, %d steps/epoch x %d epochs, global batch %d (%d per device x %d "
                 "devices x %d accumulated, %d micro-batches each) | %s", cfg.name, runtime, len(self.train_set),
                 self.steps_per_epoch, self.epochs, self.images_per_step, cfg.data.images_per_device,
                 runtime.world_size, self.accum_steps, self.settings.micro_batches, self.settings.precision)

    def finished(self) -> bool:
        """Whether the checkpoint it resumed from already ends the run (all epochs, or train.max_steps)."""
        return self.start_epoch >= self.epochs or self.cadence.reached_max_steps(self.step)

    def segments(self) -> list[dict]:
        """The run's segments up to now: the resumed checkpoint's, then this process's (retina_fn.engine.resume)."""
        images, seconds = self.meter.measured()
        mine = resume.record(start_step=self.first_step, end_step=self.step, world_size=self.runtime.world_size,
                               accum_steps=self.accum_steps, global_batch=self.images_per_step,
                               train_s=self.train_clock, wall_s=time.perf_counter() - self.wall_start,
                               measured_images=images, measured_s=seconds)
        return [*self.earlier_segments, mine]

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """A checkpoint of the current state, to resume at (epoch, step_in_epoch), with the segments so far."""
        self.saver.save(self.state, self.step, epoch, step_in_epoch, self.segments() if self.runtime.is_main else None)
        self.timed.saved(self.train_clock)


def _train(cfg, workdir, runtime, device, wall_start) -> dict[str, Any]:
    run = _Run(cfg, workdir, runtime, wall_start)
    results_file = os.path.join(workdir, "results.json")
    done_before = run.finished()
    if done_before and os.path.exists(results_file):
        log.info("%s: already finished at step %d; nothing to do (results: %s)", workdir, run.step, results_file)
        return reporting.read_json(results_file) if runtime.is_main else {}
    if run.settings.compile and not done_before:
        log.info("train.compile=True: compiling the train step (takes minutes on the first step)...")
    for epoch in range(run.start_epoch, run.epochs):
        stopped_early, step_in_epoch, last_batch = _train_epoch(run, epoch)
        run.meter.epoch_done()
        streak = int(run.state["nonfinite"])
        run.guard.check(streak, run.step, run.last_metrics, last_batch)
        next_position = (epoch + 1, 0) if step_in_epoch >= run.steps_per_epoch else (epoch, step_in_epoch)
        if streak == 0 and run.saver.saved_step != run.step:
            run.save(*next_position)
        last_epoch = epoch == run.epochs - 1 or stopped_early
        if run.val_set is not None and ((epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch):
            _evaluate_during_training(run, epoch)
        if stopped_early:
            break
    if done_before and run.val_set is not None:  # trained to the end earlier, stopped before its results
        _evaluate_during_training(run, run.epochs - 1)
    if not runtime.is_main:
        return {}
    eval_metrics = run.evaluated.metrics if run.evaluated is not None else {}
    run_segments = run.segments()
    whole = resume.whole_run(run_segments)  # a resumed run reports all of its segments, not only this one
    images_per_s, warmup_included = reporting.throughput(run_segments)
    results = {
        "name": cfg.name,
        "bbox_mAP": eval_metrics.get("bbox_mAP", float("nan")),
        **eval_metrics,
        "train_images_per_s": images_per_s,
        "train_images_per_s_includes_warmup": warmup_included,
        "epochs": round(run.step / run.steps_per_epoch, 3),
        "steps": run.step,
        "precision": run.settings.precision,
        "world_size": runtime.world_size,
        "device": str(device),
        "train_s": whole["train_s"],
        "wall_s": whole["wall_s"],
        "segments": run_segments,
    }
    if len(run_segments) > 1:
        log.info("the run's %d segments:\n%s", len(run_segments), resume.describe(run_segments))
    write_outputs(cfg, workdir, results, run.metrics_log, run.evaluated, run.val_set, runtime)
    run.metrics_log.close()
    return results


def _train_epoch(run: _Run, epoch: int) -> tuple[bool, int, tuple]:
    """Steps through one epoch (from the resume position in the first). Returns (stopped early, steps of the
    epoch done, the last step's loader batches)."""
    first = run.start_step if epoch == run.start_epoch else 0
    run.loader.set_epoch(epoch, first)
    step_in_epoch = first
    run.window.restart()
    tick = time.perf_counter()
    batch: tuple = ()
    # Each step's batches reach the device while the step before runs (data_loader.prefetch_to_device).
    for batch in data_loader.prefetch_to_device(run.loader.updates(), run.device):
        run.state, run.last_metrics = run.train_step(run.state, batch)
        run.step += 1
        step_in_epoch += 1
        run.meter.step_done(step_in_epoch - first)
        run.window.images += run.images_per_step
        run.train_clock += time.perf_counter() - tick  # the step and the wait for its batch
        tick = time.perf_counter()
        log_now = run.cadence.log_now(run.step, step_in_epoch)
        timed = run.timed.due(run.step, run.train_clock)  # a collective at rank 0's decision steps only
        save_now = run.cadence.checkpoint_now(run.step) or timed.save
        if log_now or save_now:  # the only host reads of device values inside an epoch
            streak = int(run.state["nonfinite"])
            run.guard.check(streak, run.step, run.last_metrics, batch)
            if log_now and run.runtime.is_main:
                _log_progress(run, epoch, step_in_epoch)
            if save_now and streak == 0:
                run.save(epoch, step_in_epoch)
        out_of_time = timed.stop  # train.time_budget_s: seconds of training, not counting setup or evaluation
        if out_of_time and run.step < run.epochs * run.steps_per_epoch and run.runtime.is_main:
            log.warning("train.time_budget_s=%g reached after %.0f s of training, at step %d of the schedule's %d: "
                        "training stops before the schedule ends (a checkpoint and the evaluation follow, so the "
                        "metrics are not the recipe's); --config.train.time_budget_s=None trains the whole schedule",
                        run.cfg.train.time_budget_s, run.train_clock, run.step, run.epochs * run.steps_per_epoch)
        if run.cadence.reached_max_steps(run.step) or out_of_time:
            return True, step_in_epoch, batch
        if run.cadence.epoch_cut_short(step_in_epoch - first):
            return False, run.steps_per_epoch, batch  # the seed's --performance: the rest of the epoch is skipped
    return False, step_in_epoch, batch


def _evaluate_during_training(run: _Run, epoch: int) -> None:
    run.evaluated = _evaluate(run.cfg, run.eval_step, run.state, run.val_set, run.runtime, run.pin)
    if run.runtime.is_main:
        metrics = run.evaluated.metrics
        log.info("eval after epoch %d: %s", epoch + 1,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in reporting.RESULT_KEYS))
        run.metrics_log.write({"kind": "eval", "step": run.step, "epoch": epoch, **metrics})


class _Window:
    """Images since the last progress line, and when that window started (for the line's images/s)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.images = time.perf_counter(), 0


def _log_progress(run: _Run, epoch: int, step_in_epoch: int) -> None:
    """One progress line and one JSONL record (rank 0); starts the next window."""
    scalars = hooks.host_scalars(run.last_metrics)
    ips = run.window.images / max(time.perf_counter() - run.window.start, 1e-9)
    remaining = (run.epochs - epoch - 1) * run.steps_per_epoch + run.steps_per_epoch - step_in_epoch
    eta = remaining * run.images_per_step / max(ips, 1e-9)
    mem = reporting.memory_gb(run.device)
    log.info(reporting.progress_line(epoch, run.epochs, step_in_epoch, run.steps_per_epoch, eta, scalars, ips, mem))
    run.metrics_log.write({"kind": "train", "step": run.step, "epoch": epoch, **scalars, "images_per_s": ips,
                           "memory_gb": mem, "wall_s": time.perf_counter() - run.wall_start})
    run.window.restart()


def _evaluate(cfg, eval_step, state, val_set, runtime, pin):
    loader = data_loader.make_eval_loader(cfg.data, val_set, rank=runtime.rank, world_size=runtime.world_size,
                                          pin_memory=pin, local_processes=runtime.env.local_world_size)
    return evaluation.run_evaluation(eval_step, full_params(state), loader, runtime, val_set,
                                     max_vis=cfg.eval.max_vis_images, use_faster=cfg.eval.use_faster_coco_eval)


def write_outputs(cfg, workdir, results, metrics_log, evaluated, val_set, runtime) -> None:
    """results.json, the seed's results table, curves.png, the evaluation's reports (added to results:
    evaluation.write_reports) and a few validation images with detections."""
    if evaluated is not None:
        results.update(evaluation.write_reports(cfg.eval, workdir, evaluated, val_set))
    kind = str(runtime.device.type).upper()
    row = {"name": f"{runtime.world_size}p-{kind}", "bbox_mAP": results["bbox_mAP"],
           "fps": results["train_images_per_s"], "epochs": results["epochs"], "amp_type": results["precision"]}
    reporting.write_json_atomic(os.path.join(workdir, "results.json"), results)
    reporting.plot_curves(metrics_log.read(), os.path.join(workdir, "curves.png"))
    if evaluated is not None and evaluated.vis:
        evaluation.vis_images(evaluated.vis, val_set, val_set.label_map.names, os.path.join(workdir, "vis"))
    warmup = " (warm-up steps included: too few steps to leave them out)" if results.get(
        "train_images_per_s_includes_warmup") else ""
    log.info("results in %s: bbox mAP %.4f | AP50 %.4f | AP75 %.4f | %.1f train img/s%s | %.0f s wall",
             os.path.join(workdir, "results.json"), results["bbox_mAP"], results.get("bbox_mAP_50", float("nan")),
             results.get("bbox_mAP_75", float("nan")), results["train_images_per_s"], warmup, results["wall_s"])
    print(reporting.results_table([row]), flush=True)


def stored_config(meta: dict, source: str):
    """The config a retina_fn checkpoint was trained with (its metadata's 'config'), as a ConfigDict.

    Raises:
      ConfigError: the file stores none (foreign weights, or a checkpoint written without one).
    """
    import ml_collections  # noqa: PLC0415 - the one place a stored config becomes a ConfigDict again

    if not isinstance(meta.get("config"), dict):
        raise errors.ConfigError(f"{source} stores no training config to take the validation data from: pass "
                                 f"--config")
    return ml_collections.ConfigDict(meta["config"])


def evaluate_only(cfg, workdir: str, weights: str | None, use_config_for=()) -> dict[str, Any]:
    """Evaluates `weights` (a retina_fn checkpoint or a torchvision/mmdetection RetinaNet file), or the
    workdir's newest checkpoint when weights is None, on the validation set of `cfg`, or, when cfg is None, of
    the config the checkpoint was trained with. The detector runs with the spec the checkpoint stores (a config
    must agree with it, but for the fields named in use_config_for: retina_fn.trained); its class count and label
    map must be the validation file's."""
    wall_start = time.perf_counter()
    if weights is None:
        restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"))
        if restored is None:
            raise errors.MissingFileError(
                f"no usable checkpoint in {os.path.join(workdir, 'checkpoints')} and no --weights given: evaluate "
                f"a trained run's --workdir, pass --weights FILE (a checkpoint, torchvision or mmdetection weights), "
                f"or train first (--mode train, the default)")
        weights = restored.path
    raw = read_weights(weights)
    run_cfg = cfg if cfg is not None else stored_config(raw.meta, weights)
    schema.check_config(run_cfg)
    runtime = init_runtime(run_cfg.dist)
    try:
        os.makedirs(workdir, exist_ok=True)
        resume.prepare_data(run_cfg, runtime)
        val_set = coco.load_split(run_cfg.data, "val")
        log.info("evaluating %s on %d images of %s", weights, len(val_set), val_set.ann_file)
        spec = trained.spec_for(raw, weights, cfg, use_config_for)
        class_count.check_spec_categories(spec, raw.meta, val_set, weights)
        params = tree.cast(from_state_dict(raw.state_dict, spec, source=weights), torch.float32, runtime.device)
        eval_step = make_eval_step(spec, runtime.device, precision_name=schema.precision_name(run_cfg.train))
        evaluated = _evaluate(run_cfg, eval_step, {"params": params, "frozen": {}}, val_set, runtime,
                              data_loader.pin_memory_for(runtime.device))
        if not runtime.is_main:
            return {}
        metrics = evaluated.metrics
        results = {"name": run_cfg.name, "weights": weights, **metrics, "world_size": runtime.world_size,
                   "wall_s": time.perf_counter() - wall_start}
        results.update(evaluation.write_reports(run_cfg.eval, workdir, evaluated, val_set))
        reporting.write_json_atomic(os.path.join(workdir, "eval_results.json"), results)
        if evaluated.vis:
            evaluation.vis_images(evaluated.vis, val_set, val_set.label_map.names, os.path.join(workdir, "vis"))
        log.info("evaluation of %s: %s", weights, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return results
    except KeyboardInterrupt as err:
        raise errors.RunInterrupted(f"evaluation of {weights} stopped before its results were written; the same "
                                    f"command evaluates it again") from err
    finally:
        runtime.shutdown()
