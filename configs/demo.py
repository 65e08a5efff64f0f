"""The built-in demo: RetinaNet trained from scratch on the CPU on the synthetic shapes dataset
(generated under data/synthetic on first use), then evaluated with COCO mAP on its held-out split.

    make demo      # = python -m experiments.coco_retinanet --config configs/demo.py --workdir runs/demo

Choices for a 2-core CPU: images (200 to 320 px) resized to 320 px on one square canvas; a ResNet-18 of
quarter width (16 stem channels) with GroupNorm (from scratch, frozen statistics would leave it unnormalised;
the width was chosen by measurement: docs/demo.md); a 64-channel FPN and head with GroupNorm; anchors from
16 px (octave base scale 2) to match the smallest objects; AdamW with warmup and cosine decay; GIoU box loss;
decoded images kept in memory. A fixed schedule of 15 epochs, always trained to its end, so the printed
metrics are the same on every run on one machine, busy or quiet (docs/demo.md gives the time it takes).
"""

from configs import common
from retina_fn.data import synthetic


def get_config():
    config = common.base_config()
    config.name = "demo"
    m = config.model
    m.backbone.depth = 18
    m.backbone.norm = "gn"
    m.backbone.gn_groups = 16
    m.backbone.base_width = 16
    m.backbone.frozen_stages = -1
    m.backbone.channels_last = True  # 2 to 5% faster on the CPU (docs/benchmarks.md)
    m.fpn.out_channels = 64
    m.head.feat_channels = 64
    m.head.stacked_convs = 2
    m.head.norm = "gn"
    m.head.gn_groups = 16
    m.anchors.octave_base_scale = 2.0
    m.loss.box_loss = "giou"
    m.loss.box_weight = 2.0
    m.test.max_candidates = 2000
    d = config.data
    d.dataset = "synthetic"
    d.root = "data/synthetic"
    d.update(synthetic.LAYOUT)  # the generator's file names under the root
    m.num_classes = d.synthetic.get_ref("num_classes")
    d.scale = (320, 320)
    d.landscape_canvas = (320, 320)
    d.portrait_canvas = (320, 320)
    d.max_boxes = 32
    d.box_buckets = (8, 16, 32)  # images hold 1 to 7 objects: the assignment works on 8 rows, not max_boxes
    d.images_per_device = 8
    d.eval_images_per_device = 8
    d.workers = 0
    d.preload = True
    o = config.optim
    o.name = "adamw"
    o.lr = 2e-3
    o.weight_decay = 0.05
    o.decay_norm_and_bias = False
    o.clip_norm = 10.0
    o.warmup_iters = 100
    o.schedule = "cosine"
    o.epochs = 15
    t = config.train
    t.log_every = 20
    t.eval_every_epochs = 100  # evaluate once, at the end
    # The whole schedule trains every time, so the metrics do not depend on the machine's speed; the budget
    # only stops a hung or pathologically slow run (with a warning, a checkpoint and the evaluation).
    t.time_budget_s = 7200.0
    config.eval.max_vis_images = 6
    return config
