"""The training loop: data, state, the pure step, logging, checkpoints, evaluation, results.

    train_and_evaluate(cfg, workdir)   # what `python -m experiments.coco_retinanet` runs
    evaluate_only(cfg, workdir, weights)

Everything stateful lives here (files, the process group, the clock); the step it drives is pure. Rank 0
alone logs and writes files; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from experiments import evaluation, reporting
from retina_fn import checkpoint, parallel, rng, tree
from retina_fn.data import coco, loader as data_loader, synthetic
from retina_fn.model import retinanet
from retina_fn.train import full_params, init_train_state, make_eval_step, make_train_step

log = logging.getLogger("retina_fn")


class NonFiniteLoss(RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive steps."""


def prepare_data(cfg, runtime) -> None:
    """For data.dataset == 'synthetic', generates the dataset under data.root on rank 0 when absent
    (others wait) and points the config's annotation/image paths at it."""
    if cfg.data.dataset == "coco":
        return
    if cfg.data.dataset != "synthetic":
        raise ValueError(f"data.dataset must be 'coco' or 'synthetic', got {cfg.data.dataset!r}")
    s = cfg.data.synthetic
    if runtime.is_main:
        paths = synthetic.ensure_synthetic(cfg.data.root, s.num_train, s.num_val, s.seed, s.image_size, s.num_classes)
        log.info("synthetic dataset at %s\n%s", cfg.data.root, synthetic.format_summary(paths.summary))
    runtime.barrier()
    cfg.data.train_ann = "annotations/instances_train.json"
    cfg.data.train_images = "train"
    cfg.data.val_ann = "annotations/instances_val.json"
    cfg.data.val_images = "val"


def check_num_classes(cfg, label_map) -> None:
    if label_map.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes is {cfg.model.num_classes} but the annotation file has {label_map.num_classes} "
            f"categories; set --config.model.num_classes={label_map.num_classes}")


def initial_params(cfg, key) -> dict:
    """Random init, with the backbone from model.backbone.pretrained (a torchvision ResNet file) when set."""
    params = retinanet.init(key, cfg.model)
    if cfg.model.backbone.pretrained:
        from retina_fn import interop

        state_dict = interop.load_state_dict(cfg.model.backbone.pretrained)
        params["backbone"] = interop.resnet_from_torchvision(state_dict, cfg.model.backbone,
                                                             source=cfg.model.backbone.pretrained)
        log.info("backbone initialised from %s", cfg.model.backbone.pretrained)
    return params


def config_json(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())


def _save(workdir: str, state: dict, cfg, label_map, epoch: int, step_in_epoch: int, runtime) -> None:
    if runtime.is_main:
        meta = {"config": config_json(cfg), "label_map": label_map.to_dict(),
                "data_position": {"epoch": epoch, "step_in_epoch": step_in_epoch},
                "world_size": runtime.world_size}
        path = checkpoint.save(os.path.join(workdir, "checkpoints"), int(state["step"]), state, meta,
                               keep=cfg.train.keep_checkpoints)
        log.info("checkpoint %s", path)
    runtime.barrier()


def _host_scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    values = torch.stack([v.detach().float() for v in metrics.values()]).cpu().tolist()
    return dict(zip(metrics.keys(), values))


def _precision_name(cfg) -> str:
    from retina_fn import precision

    return precision.precision_from_config(cfg.train).name


def train_and_evaluate(cfg, workdir: str) -> dict[str, Any]:
    """Trains cfg on its dataset, evaluating every train.eval_every_epochs epochs, resuming from the
    workdir's newest usable checkpoint. Returns the final results (rank 0; {} elsewhere)."""
    wall_start = time.perf_counter()
    runtime = parallel.init(cfg.dist)
    device = runtime.device
    try:
        return _train(cfg, workdir, runtime, device, wall_start)
    finally:
        runtime.shutdown()


def _any_rank(runtime, flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any: ranks whose clocks differ must still stop together."""
    if runtime.world_size == 1:
        return flag
    votes = runtime.reduce_sum({"flag": torch.tensor(int(flag), device=device)})
    return bool(votes["flag"] > 0)


def _train(cfg, workdir, runtime, device, wall_start) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    prepare_data(cfg, runtime)
    if runtime.is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    train_set = coco.load_split(cfg.data, "train")
    val_set = coco.load_split(cfg.data, "val") if cfg.train.validate else None
    check_num_classes(cfg, train_set.label_map)
    if val_set is not None:
        train_set.label_map.check_same(val_set.label_map, "the validation annotation file")

    root = rng.key(cfg.seed)
    model_key, data_key = rng.split(root)
    restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"))
    start_epoch, start_step = 0, 0
    template = init_train_state(cfg, model_key, params=None if restored else initial_params(cfg, model_key),
                                device=device)
    if restored is not None:
        state = checkpoint.restore_into(restored.state, template, restored.path)
        state = tree.cast(state, device=device)
        position = restored.meta["data_position"]
        start_epoch, start_step = int(position["epoch"]), int(position["step_in_epoch"])
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", restored.path, restored.step,
                 start_epoch + 1, start_step)
    else:
        state = template
    state = runtime.broadcast_tree(state)
    runtime.verify_same(state["params"])

    pin = device.type != "cpu"
    train_loader = data_loader.make_train_loader(cfg.data, train_set, rank=runtime.rank,
                                                 world_size=runtime.world_size, key=data_key,
                                                 start_epoch=start_epoch, start_step=start_step, pin_memory=pin)
    steps_per_epoch = train_loader.steps_per_epoch
    accum = int(cfg.optim.accum_steps)
    global_batch = cfg.data.images_per_device * runtime.world_size
    if steps_per_epoch == 0:
        raise ValueError(f"{train_set.ann_file}: too few images for one batch of {global_batch}")
    train_step = make_train_step(cfg, steps_per_epoch=steps_per_epoch, global_batch=global_batch,
                                 reduce=runtime.reduce_mean, device=device)
    eval_step = make_eval_step(cfg, device=device)
    epochs = int(cfg.optim.epochs)
    metrics_log = reporting.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    log.info("%s | %s | %d train images, %d steps/epoch x %d epochs, global batch %d (%d per device x %d, "
             "%d micro-batches) | %s", cfg.name, runtime, len(train_set), steps_per_epoch, epochs, global_batch,
             cfg.data.images_per_device, runtime.world_size, accum, _precision_name(cfg))

    budget = cfg.train.time_budget_s  # seconds of training (the steps), not counting setup or evaluation
    train_clock = 0.0
    max_steps = cfg.train.max_steps
    perf_steps = cfg.train.performance_steps
    ckpt_every = cfg.train.checkpoint_every_steps
    train_images, train_seconds = 0, 0.0
    eval_metrics: dict[str, float] | None = None
    vis: list = []
    stopped_early = False
    saved_step = -1
    step = int(state["step"])  # a host copy: the step adds exactly 1 per call, so no device read is needed
    images_per_step = int(cfg.data.images_per_device) * runtime.world_size
    epoch = start_epoch
    step_in_epoch = start_step
    for epoch in range(start_epoch, epochs):
        first = start_step if epoch == start_epoch else 0
        train_loader.set_epoch(epoch, first)
        step_in_epoch = first
        window_start, window_images = time.perf_counter(), 0
        tick = time.perf_counter()
        for batch in train_loader:
            t0 = time.perf_counter()
            batch_dev = evaluation.to_device(batch, device)
            key = rng.fold_in(state["rng"], state["step"])
            state, metrics = train_step(state, batch_dev, key)
            step += 1
            step_in_epoch += 1
            streak = int(state["nonfinite"])  # one small host sync per step: the guard needs it
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_clock += time.perf_counter() - tick  # the step and the wait for its batch
            tick = time.perf_counter()
            if step_in_epoch - first > 2:  # the first steps include compilation and warm-up
                train_images += images_per_step
                train_seconds += dt
            window_images += images_per_step
            if streak:
                scalars = _host_scalars(metrics)
                bad = [k for k in ("loss_cls", "loss_box") if not torch.isfinite(torch.tensor(scalars[k]))]
                ids = batch["image_id"].tolist()
                log.warning("step %d: non-finite %s (image ids %s); update skipped (%d in a row)", step,
                            " and ".join(bad) or "gradient", ids, streak)
                if streak >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLoss(
                        f"{streak} consecutive non-finite steps (last: {' and '.join(bad) or 'gradient'} on "
                        f"image ids {ids}); stopping. The last checkpoint in {workdir}/checkpoints is intact. "
                        f"Try a lower --config.optim.lr, --config.optim.clip_norm=10 or a longer warmup.")
            log_now = step % cfg.train.log_every == 0 or step_in_epoch == steps_per_epoch
            if log_now and runtime.is_main:
                scalars = _host_scalars(metrics)
                elapsed = time.perf_counter() - window_start
                ips = window_images / max(elapsed, 1e-9)
                remaining = (epochs - epoch - 1) * steps_per_epoch + steps_per_epoch - step_in_epoch
                eta = remaining * images_per_step / max(ips, 1e-9)
                mem = reporting.memory_gb(device)
                log.info(reporting.progress_line(epoch, epochs, step_in_epoch, steps_per_epoch, eta, scalars, ips, mem))
                metrics_log.write({"kind": "train", "step": step, "epoch": epoch, **scalars, "images_per_s": ips,
                                   "memory_gb": mem, "wall_s": time.perf_counter() - wall_start})
                window_start, window_images = time.perf_counter(), 0
            if ckpt_every and step % ckpt_every == 0 and streak == 0:
                _save(workdir, state, cfg, train_set.label_map, epoch, step_in_epoch, runtime)
                saved_step = step
            out_of_time = budget is not None and _any_rank(runtime, train_clock >= budget, device)
            if (max_steps is not None and step >= max_steps) or out_of_time:
                stopped_early = True
                break
            if perf_steps is not None and step_in_epoch - first >= perf_steps:
                step_in_epoch = steps_per_epoch  # the seed's --performance: the rest of the epoch is skipped
                break
        epoch_done = step_in_epoch >= steps_per_epoch
        next_position = (epoch + 1, 0) if epoch_done else (epoch, step_in_epoch)
        if int(state["nonfinite"]) == 0 and saved_step != step:
            _save(workdir, state, cfg, train_set.label_map, *next_position, runtime)
        last_epoch = epoch == epochs - 1 or stopped_early
        if val_set is not None and ((epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch):
            eval_metrics, vis = _evaluate(cfg, eval_step, state, val_set, runtime, pin)
            if runtime.is_main:
                log.info("eval after epoch %d: %s", epoch + 1,
                         ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items() if k in reporting.RESULT_KEYS))
                metrics_log.write({"kind": "eval", "step": step, "epoch": epoch, **eval_metrics})
        if stopped_early:
            break

    if not runtime.is_main:
        return {}
    wall = time.perf_counter() - wall_start
    train_ips = train_images / train_seconds if train_seconds else 0.0
    epochs_done = step / steps_per_epoch
    results = {
        "name": cfg.name,
        "bbox_mAP": (eval_metrics or {}).get("bbox_mAP", float("nan")),
        **(eval_metrics or {}),
        "train_images_per_s": train_ips,
        "epochs": round(epochs_done, 3),
        "steps": step,
        "precision": _precision_name(cfg),
        "world_size": runtime.world_size,
        "device": str(device),
        "train_s": train_clock,
        "wall_s": wall,
    }
    write_outputs(cfg, workdir, results, metrics_log, vis, val_set, runtime)
    return results


def _evaluate(cfg, eval_step, state, val_set, runtime, pin):
    loader = data_loader.make_eval_loader(cfg.data, val_set, rank=runtime.rank, world_size=runtime.world_size,
                                          pin_memory=pin)
    return evaluation.run_evaluation(eval_step, full_params(state), loader, runtime, val_set,
                                     max_vis=cfg.eval.max_vis_images, use_faster=cfg.eval.use_faster_coco_eval)


def write_outputs(cfg, workdir, results, metrics_log, vis, val_set, runtime) -> None:
    """results.json, the seed's results table, curves.png and a few validation images with detections."""
    kind = str(runtime.device.type).upper()
    row = {"name": f"{runtime.world_size}p-{kind}", "bbox_mAP": results["bbox_mAP"],
           "fps": results["train_images_per_s"], "epochs": results["epochs"], "amp_type": results["precision"]}
    reporting.write_json_atomic(os.path.join(workdir, "results.json"), results)
    reporting.plot_curves(metrics_log.read(), os.path.join(workdir, "curves.png"))
    if vis and val_set is not None:
        evaluation.vis_images(vis, val_set, val_set.label_map.names, os.path.join(workdir, "vis"))
    log.info("results in %s: bbox mAP %.4f | AP50 %.4f | AP75 %.4f | %.1f train img/s | %.0f s wall",
             os.path.join(workdir, "results.json"), results["bbox_mAP"], results.get("bbox_mAP_50", float("nan")),
             results.get("bbox_mAP_75", float("nan")), results["train_images_per_s"], results["wall_s"])
    print(reporting.results_table([row]), flush=True)


def evaluate_only(cfg, workdir: str, weights: str | None) -> dict[str, Any]:
    """Evaluates `weights` (a retina_fn checkpoint or a torchvision/mmdetection RetinaNet file), or the
    workdir's newest checkpoint when weights is None, on the validation set."""
    wall_start = time.perf_counter()
    runtime = parallel.init(cfg.dist)
    try:
        os.makedirs(workdir, exist_ok=True)
        prepare_data(cfg, runtime)
        val_set = coco.load_split(cfg.data, "val")
        check_num_classes(cfg, val_set.label_map)
        if weights is None:
            restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"))
            if restored is None:
                raise FileNotFoundError(f"no usable checkpoint in {workdir}/checkpoints and no --weights given")
            weights = restored.path
        params, _ = evaluation.load_params(weights, cfg)
        params = tree.cast(params, torch.float32, runtime.device)
        eval_step = make_eval_step(cfg, device=runtime.device)
        metrics, vis = _evaluate(cfg, eval_step, {"params": params, "frozen": {}}, val_set, runtime,
                                 runtime.device.type != "cpu")
        if not runtime.is_main:
            return {}
        results = {"name": cfg.name, "weights": weights, **metrics, "world_size": runtime.world_size,
                   "wall_s": time.perf_counter() - wall_start}
        reporting.write_json_atomic(os.path.join(workdir, "eval_results.json"), results)
        if vis:
            evaluation.vis_images(vis, val_set, val_set.label_map.names, os.path.join(workdir, "vis"))
        log.info("evaluation of %s: %s", weights, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return results
    finally:
        runtime.shutdown()
