"""End to end: the entry point on the smoke config (train, evaluate, resume, overrides) and every config."""

import glob
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from configs import common
from retina_fn.engine import trainer
from retina_fn import checkpoint, rng, tree
from retina_fn.model import retinanet
from tests.model_fixtures import spec_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "common.py")))


def smoke_config(data_root, **overrides):
    from configs import smoke

    cfg = smoke.get_config()
    cfg.data.root = str(data_root)
    return common.override(cfg, **overrides)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    workdir = base / "run"
    results = trainer.train_and_evaluate(smoke_config(base / "data"), str(workdir))
    return workdir, results


def untrained_eval(cfg, workdir) -> dict:
    """Validation metrics of the parameters a run of `cfg` starts from, before any step: the trainer's model
    key (the first of rng.split(rng.key(cfg.seed))) through train_setup.initial_params, saved as a step-0
    checkpoint without a spec (so the config's post-processing applies) and scored by trainer.evaluate_only
    (the program's evaluation path) into `workdir`."""
    from retina_fn.engine import resume as train_setup

    with open(os.path.join(cfg.data.root, cfg.data.train_ann)) as f:
        num_classes = len(json.load(f)["categories"])  # what model.num_classes='auto' resolves to
    model_key, _ = rng.split(rng.key(cfg.seed))
    spec = spec_of(cfg, num_classes)
    params = train_setup.initial_params(spec, model_key, cfg.model.backbone.pretrained or None)
    trainable, frozen = retinanet.split_trainable(params, spec)
    weights = checkpoint.save(os.path.join(workdir, "checkpoints"), 0, {"params": trainable, "frozen": frozen})
    return trainer.evaluate_only(cfg, str(workdir), weights)


def test_smoke_run_learns_and_reports(smoke_run):
    """The run beats its own starting point, measured here on the same validation split.

    Two baselines of the untrained parameters (same seed): at the configured score threshold (0.05) every
    score sits at the head's prior probability 0.01, so nothing is detected and AP50 is 0; with the
    threshold at 0 the untrained model's top boxes (about its anchors, at near-equal scores) are all scored:
    chance level, about 0.0003 AP50 here. The trained model (about 0.12 AP50 after 240 steps) must beat the
    larger of the two by 0.05: far above chance, and far enough below 0.12 to leave room for float
    differences between machines."""
    workdir, results = smoke_run
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    data = workdir.parent / "data"
    at_threshold = untrained_eval(smoke_config(data), workdir.parent / "untrained")
    every_box = untrained_eval(smoke_config(data, **{"model.test.score_thr": 0.0}), workdir.parent / "untrained_all")
    assert at_threshold["num_detections"] == 0, at_threshold
    assert every_box["num_detections"] > 0, every_box
    baseline = max(at_threshold["bbox_mAP_50"], every_box["bbox_mAP_50"])
    assert results["bbox_mAP_50"] > baseline + 0.05, (results["bbox_mAP_50"], at_threshold["bbox_mAP_50"],
                                                      every_box["bbox_mAP_50"])
    on_disk = json.load(open(workdir / "results.json"))
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "train_images_per_s", "epochs", "precision",
                "world_size", "wall_s"):
        assert key in on_disk
    assert on_disk["epochs"] == 30 and on_disk["world_size"] == 1 and on_disk["precision"] == "fp32"
    assert os.path.getsize(workdir / "curves.png") > 1000
    assert len(glob.glob(str(workdir / "vis" / "*.png"))) == 2
    assert json.load(open(workdir / "config.json"))["optim"]["name"] == "adamw"


def test_resume_continues_exactly(tmp_path):
    data = tmp_path / "data"
    straight, split = tmp_path / "straight", tmp_path / "split"
    quick = {"train.validate": False, "optim.epochs": 2}
    trainer.train_and_evaluate(smoke_config(data, **quick, **{"train.max_steps": 10}), str(straight))
    trainer.train_and_evaluate(smoke_config(data, **quick, **{"train.max_steps": 5}), str(split))
    assert checkpoint.restore_latest(str(split / "checkpoints")).step == 5
    trainer.train_and_evaluate(smoke_config(data, **quick, **{"train.max_steps": 10}), str(split))
    a = checkpoint.restore_latest(str(straight / "checkpoints"))
    b = checkpoint.restore_latest(str(split / "checkpoints"))
    assert a.step == b.step == 10
    # step 10 crosses the epoch boundary (8 steps per epoch), so data order and flips of epoch 2 count too
    assert a.meta["data_position"] == b.meta["data_position"] == {"epoch": 1, "step_in_epoch": 2}
    assert tree.all_equal(a.state, b.state)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.coco_retinanet", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_overrides_land_and_typos_fail_clearly(tmp_path):
    done = run_cli("--config", "configs/smoke.py", f"--workdir={tmp_path / 'run'}", "--config.optim.lr=0.0123",
                   f"--config.data.root={tmp_path / 'data'}", "--config.train.max_steps=1",
                   "--config.train.validate=False")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.load(open(tmp_path / "run" / "config.json"))["optim"]["lr"] == 0.0123
    typo = run_cli("--config", "configs/smoke.py", f"--workdir={tmp_path / 'typo'}", "--config.optim.lrr=0.1")
    assert typo.returncode != 0
    assert "Did you mean" in typo.stderr and "lr" in typo.stderr


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_builds_a_model(name):
    cfg = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    cfg.lock()
    if cfg.model.num_classes == "auto":  # what a run resolves from its annotation file (retina_fn.class_count)
        cfg.model.num_classes = 3
    params = retinanet.init(rng.key(0), spec_of(cfg))
    logits, deltas = retinanet.apply(params, torch.zeros(1, 3, 128, 128), spec_of(cfg))
    assert logits.shape[-1] == cfg.model.num_classes and deltas.shape[-1] == 4


def test_1x_config_matches_the_reference():
    from configs import retinanet_r50_fpn_1x_coco as r50

    cfg = r50.get_config()
    m, d, o = cfg.model, cfg.data, cfg.optim
    assert (m.num_classes, m.backbone.depth, m.backbone.style, m.backbone.frozen_stages) == (80, 50, "pytorch", 1)
    assert m.backbone.norm == "frozen_bn" and m.backbone.norm_affine_trainable
    assert (m.fpn.out_channels, m.fpn.extra_source, m.fpn.relu_before_extra) == (256, "input", False)
    assert (m.head.stacked_convs, m.head.feat_channels, m.head.norm, m.head.prior_prob) == (4, 256, "none", 0.01)
    assert (m.anchors.octave_base_scale, m.anchors.scales_per_octave) == (4.0, 3)
    assert tuple(m.anchors.ratios) == (0.5, 1.0, 2.0) and tuple(m.anchors.strides) == (8, 16, 32, 64, 128)
    assert tuple(m.coder.means) == (0.0,) * 4 and tuple(m.coder.stds) == (1.0,) * 4
    assert (m.assigner.pos_iou_thr, m.assigner.neg_iou_thr, m.assigner.min_pos_iou) == (0.5, 0.4, 0.0)
    assert (m.loss.focal_gamma, m.loss.focal_alpha, m.loss.box_loss, m.loss.normalizer) == (2.0, 0.25, "l1", "batch")
    t = m.test
    assert (t.nms_pre, t.score_thr, t.nms_iou, t.max_per_img) == (1000, 0.05, 0.5, 100)
    assert tuple(d.mean) == (123.675, 116.28, 103.53) and tuple(d.std) == (58.395, 57.12, 57.375)
    assert tuple(d.scale) == (1333, 800) and d.flip_prob == 0.5 and d.images_per_device == 2
    assert (o.name, o.base_lr, o.base_batch, o.momentum, o.weight_decay) == ("sgd", 0.01, 16, 0.9, 1e-4)
    assert (o.warmup_iters, o.warmup_ratio, tuple(o.step_epochs), o.gamma, o.epochs) == (500, 0.001, (8, 11), 0.1, 12)
    assert o.clip_norm is None and cfg.train.precision == "fp32"
    assert cfg.dist.normalizer == "local"  # each GPU divides its loss by its own positives, as mmdetection 2.9
    from configs import retinanet_r50_fpn_1x_coco_npu as npu

    n = npu.get_config()
    assert (n.data.images_per_device, n.optim.lr, n.optim.clip_norm, n.train.opt_level) == (8, 0.04, 10.0, "O1")
    assert (n.train.loss_scale.init, n.train.loss_scale.dynamic) == (64.0, False)
    assert n.dist.normalizer == "local"


@pytest.mark.parametrize("name", ["retinanet_r18_fpn_1x_coco", "retinanet_r101_fpn_1x_coco", "own_dataset",
                                  "torchvision_retinanet_v1"])
def test_configs_of_the_reference_recipes_use_the_per_replica_normaliser(name):
    # mmdetection 2.9 and torchvision's reference scripts both divide each replica's loss by its own count.
    cfg = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    assert cfg.dist.normalizer == "local"


def test_non_finite_losses_stop_the_run_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    """From step 5 on the model's outputs are made non-finite: each step is skipped, and once the guard (which
    reads the device's streak counter only at log and checkpoint steps, here every 2 steps) sees
    train.max_nonfinite_steps or more in a row, the run stops with an error naming the term and the images,
    leaving the checkpoint of step 4 as the newest (step 6's is not written: its streak is 2)."""
    real_apply = retinanet.apply
    calls = {"n": 0}

    def poisoned_apply(params, images, model_cfg, image_hw=None):
        calls["n"] += 1
        logits, deltas = real_apply(params, images, model_cfg, image_hw)
        return (logits * float("nan"), deltas) if calls["n"] > 4 else (logits, deltas)

    monkeypatch.setattr(retinanet, "apply", poisoned_apply)
    cfg = smoke_config(tmp_path / "data", **{"train.checkpoint_every_steps": 2, "train.max_nonfinite_steps": 3,
                                             "train.validate": False})
    with pytest.raises(trainer.NonFiniteLoss, match=r"4 consecutive non-finite steps \(last: loss_cls on image ids"):
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"))  # steps 5..8 skipped, seen at step 8
    newest = checkpoint.restore_latest(str(tmp_path / "run" / "checkpoints"))
    assert newest.step == 4 and int(newest.state["nonfinite"]) == 0
    assert all(torch.isfinite(v).all() for v in tree.leaves(newest.state["params"]))


def test_time_budget_counts_training_time_and_stops_with_a_checkpoint(tmp_path, caplog):
    # A budget far below one step's time: the run stops after its first step, saves it, says so and still reports.
    cfg = smoke_config(tmp_path / "data", **{"train.validate": False, "train.time_budget_s": 1e-6})
    with caplog.at_level(logging.WARNING, logger="retina_fn.engine.trainer"):
        results = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert results["steps"] == 1
    assert any("time_budget_s=1e-06 reached" in r.getMessage() and "at step 1 of the schedule's" in r.getMessage()
               for r in caplog.records)
    assert 0 < results["train_s"] <= results["wall_s"]
    assert checkpoint.restore_latest(str(tmp_path / "run" / "checkpoints")).step == 1


def test_synthetic_dataset_files_are_named_by_the_config(tmp_path):
    """prepare_data generates the synthetic set and never rewrites the config; a config whose paths do not
    name the generator's files is refused with the flags that fix it."""
    from types import SimpleNamespace

    from retina_fn.engine import resume as train_setup

    alone = SimpleNamespace(is_main=True, barrier=lambda: None)
    cfg = smoke_config(tmp_path / "data")
    before = cfg.to_json()
    train_setup.prepare_data(cfg, alone)
    assert cfg.to_json() == before
    assert (tmp_path / "data" / cfg.data.train_ann).is_file() and (tmp_path / "data" / cfg.data.val_images).is_dir()
    wrong = smoke_config(tmp_path / "data", **{"data.train_ann": "annotations/instances_train2017.json"})
    with pytest.raises(ValueError, match="--config.data.train_ann=annotations/instances_train.json"):
        train_setup.prepare_data(wrong, alone)
