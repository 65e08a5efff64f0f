"""A minutes-long end-to-end run for tests: a tiny RetinaNet trained from scratch on a small synthetic
set (128 px canvases), then evaluated. Not meant to reach a useful mAP."""

from configs import common


def get_config():
    config = common.base_config()
    config.name = "smoke"
    m = config.model
    m.backbone.depth = 18
    m.backbone.norm = "gn"
    m.backbone.gn_groups = 8
    m.backbone.base_width = 16
    m.backbone.frozen_stages = -1
    m.fpn.out_channels = 32
    m.head.feat_channels = 32
    m.head.stacked_convs = 1
    m.head.norm = "gn"
    m.head.gn_groups = 8
    m.anchors.octave_base_scale = 2.0
    m.test.max_per_img = 50
    d = config.data
    d.dataset = "synthetic"
    d.root = "data/synthetic_smoke"
    d.synthetic.num_train = 64
    d.synthetic.num_val = 16
    d.synthetic.image_size = 128
    m.num_classes = d.synthetic.get_ref("num_classes")
    d.scale = (160, 128)
    d.landscape_canvas = (128, 160)
    d.portrait_canvas = (160, 128)
    d.max_boxes = 16
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
    o.warmup_iters = 10
    o.schedule = "cosine"
    o.epochs = 30
    config.train.log_every = 8
    config.train.eval_every_epochs = 100  # once, at the end
    config.eval.max_vis_images = 2
    return config
