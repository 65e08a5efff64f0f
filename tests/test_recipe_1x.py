"""The 1x recipe (configs/retinanet_r50_fpn_1x_coco.py) learns end to end on the synthetic shapes.

Kept from the recipe: SGD (momentum 0.9, weight decay 1e-4) at lr 0.01 per 16 images (linear scaling rule),
linear warmup from 0.001 x lr, x0.1 at epochs 8 and 11 of 12; focal loss and L1 box loss divided by
mmdetection's batch normaliser; a frozen-BN ResNet (stem and layer1 frozen, BN affines trained); the FPN,
anchors, assigner, coder and test settings.

Overrides, all of size: backbone depth 18 and base width 16; FPN and head 64 channels with 1 stacked conv
(a narrow 4-conv head under the recipe's std-0.01 init passes almost no signal at first); 5 classes (the
synthetic set's); 256 training images of ~128 px, 64 validation images; data.scale (160, 128) on 128 x 160 /
160 x 128 canvases, up to 16 boxes; 8 images per step, so lr 0.005; warmup 16 steps instead of 500 (31 steps
per epoch, 372 in all: the decays fall at steps 248 and 341); no loader workers, images preloaded; a log
record every step, one evaluation at the end.

Pretrained weights: the recipe starts from an ImageNet ResNet, whose stored BN statistics normalise its
activations. None can be downloaded here, and a random frozen-BN ResNet has statistics 0 / 1, no
normalisation at all (it barely learns). Stand-in: a random ResNet-18 whose BN statistics are set once to
the mean and variance of each BN's input on one training batch (layer by layer, as BN in training mode
would see them), written as a torchvision-layout backbone file and loaded through
model.backbone.pretrained like a real checkpoint. Its convolutions stay random: this checks the recipe's
optimiser, schedule, loss and normaliser, not ImageNet features.
"""

import json

import torch
import torch.nn.functional as F

from configs import common, retinanet_r50_fpn_1x_coco
from retina_fn.engine import trainer
from retina_fn import rng, tree
from retina_fn.data import coco, synthetic
from retina_fn.data import loader as data_loader
from retina_fn.model import retinanet
from tests.test_experiment import untrained_eval
from tests.model_fixtures import spec_of

SIZE_OVERRIDES = {
    "model.backbone.depth": 18,
    "model.backbone.base_width": 16,
    "model.fpn.out_channels": 64,
    "model.head.feat_channels": 64,
    "model.head.stacked_convs": 1,
    "model.num_classes": 5,
    "data.dataset": "synthetic",
    **{f"data.{k}": v for k, v in synthetic.LAYOUT.items()},
    "data.synthetic.num_train": 256,
    "data.synthetic.num_val": 64,
    "data.synthetic.image_size": 128,
    "data.scale": (160, 128),
    "data.landscape_canvas": (128, 160),
    "data.portrait_canvas": (160, 128),
    "data.max_boxes": 16,
    "data.images_per_device": 8,
    "data.eval_images_per_device": 8,
    "data.workers": 0,
    "data.preload": True,
    "optim.warmup_iters": 16,
    "train.log_every": 1,
    "train.eval_every_epochs": 12,
}


def recipe_config(data_root, **overrides):
    cfg = retinanet_r50_fpn_1x_coco.get_config()
    return common.override(cfg, **{**SIZE_OVERRIDES, "data.root": str(data_root), **overrides})


def calibrated_backbone_file(cfg, path) -> str:
    """A random ResNet (model.init's backbone) whose frozen BN statistics are the batch statistics of each
    BN's input on the first training batch, saved with torchvision's key names. Returns `path`."""
    s = cfg.data.synthetic
    synthetic.ensure_synthetic(cfg.data.root, s.num_train, s.num_val, s.seed, s.image_size, s.num_classes)
    loader = data_loader.make_train_loader(cfg.data, coco.load_split(cfg.data, "train"), rank=0, world_size=1,
                                           key=rng.key(1))
    images = next(iter(loader))["image"]
    backbone = retinanet.init(rng.key(2), spec_of(cfg))["backbone"]

    def conv_bn(conv, bn, x, stride=1, padding=0):  # training-mode BN with momentum 1 stores the batch's stats
        y = F.conv2d(x, conv["weight"], stride=stride, padding=padding)
        return F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=True,
                            momentum=1.0, eps=cfg.model.backbone.bn_eps)

    with torch.no_grad():  # ResNet-18/34 basic blocks, torchvision's layout
        x = F.max_pool2d(F.relu(conv_bn(backbone["conv1"], backbone["bn1"], images, 2, 3)), 3, 2, 1)
        for stage in range(1, 5):
            for i, block in backbone[f"layer{stage}"].items():
                stride = 2 if stage > 1 and i == "0" else 1
                y = F.relu(conv_bn(block["conv1"], block["bn1"], x, stride, 1))
                y = conv_bn(block["conv2"], block["bn2"], y, 1, 1)
                ds = block.get("downsample")
                x = F.relu(y + (conv_bn(ds["0"], ds["1"], x, stride) if ds else x))
    torch.save({p.replace(tree.SEP, "."): v for p, v in tree.flatten_by_path(backbone).items()}, path)
    return str(path)


def expected_lr(step: int, steps_per_epoch: int) -> float:
    """The 1x schedule written out for this run: lr 0.01 x 8 / 16, linear warmup over 16 steps from 0.001 of
    it, x0.1 from the first step of epoch 8 and again of epoch 11 (0-based epochs)."""
    base = 0.01 * 8 / 16
    warmup = 0.001 + (1 - 0.001) * step / 16 if step < 16 else 1.0
    epoch = step // steps_per_epoch
    return base * warmup * 0.1 ** ((epoch >= 8) + (epoch >= 11))


def test_1x_recipe_learns_on_synthetic_shapes(tmp_path):
    """12 epochs of the recipe: the loss falls (last 10 steps' mean below 0.7 x the first 10's; about 0.5
    is reached), every step's lr is the schedule's (warmup, then the decays at the epoch 8 and 11
    boundaries), and validation AP50 beats the untrained starting point measured here by 0.01. The baseline
    is the larger of the untrained model's AP50 at the configured score threshold (0: every score sits at
    the prior 0.01, nothing is detected) and with the threshold at 0 (its top boxes, about its anchors, at
    near-equal scores: chance, 0.001 to 0.005 over seeds 0-2). Trained, the model reaches 0.030 to 0.033
    AP50 over seeds 0-2: low in absolute terms (random convolutions, 372 SGD steps), but 6 to 30 times
    chance."""
    cfg = recipe_config(tmp_path / "data")
    assert (cfg.optim.name, cfg.optim.step_epochs, cfg.optim.epochs, cfg.model.loss.box_loss,
            cfg.model.loss.normalizer, cfg.model.backbone.norm, cfg.model.backbone.frozen_stages) == (
        "sgd", (8, 11), 12, "l1", "batch", "frozen_bn", 1)
    cfg.model.backbone.pretrained = calibrated_backbone_file(cfg, tmp_path / "resnet18_calibrated.pth")

    at_threshold = untrained_eval(cfg, tmp_path / "untrained")
    every_box = untrained_eval(recipe_config(tmp_path / "data", **{
        "model.backbone.pretrained": cfg.model.backbone.pretrained, "model.test.score_thr": 0.0}),
        tmp_path / "untrained_all")
    assert at_threshold["num_detections"] == 0 and every_box["num_detections"] > 0

    workdir = tmp_path / "run"
    results = trainer.train_and_evaluate(cfg, str(workdir))
    assert results["epochs"] == 12
    steps_per_epoch = results["steps"] // 12
    train = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, results["steps"] + 1))

    # a record's step counts updates done; its lr is the one its update used, schedule(step - 1)
    lrs = {r["step"] - 1: r["lr"] for r in train}
    for step, lr in lrs.items():
        assert abs(lr - expected_lr(step, steps_per_epoch)) <= 1e-6 * expected_lr(step, steps_per_epoch), step
    first_decay, second_decay = 8 * steps_per_epoch, 11 * steps_per_epoch
    assert abs(lrs[0] - 5e-6) < 1e-11 and abs(lrs[16] - 0.005) < 1e-9
    assert abs(lrs[first_decay - 1] - 0.005) < 1e-9 and abs(lrs[first_decay] - 0.0005) < 1e-10
    assert abs(lrs[second_decay - 1] - 0.0005) < 1e-10 and abs(lrs[second_decay] - 0.00005) < 1e-11

    losses = [r["loss"] for r in train]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    baseline = max(at_threshold["bbox_mAP_50"], every_box["bbox_mAP_50"])
    assert results["bbox_mAP_50"] > baseline + 0.01, (results["bbox_mAP_50"], at_threshold["bbox_mAP_50"],
                                                      every_box["bbox_mAP_50"])
