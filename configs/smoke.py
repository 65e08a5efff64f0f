"""A minutes-long end-to-end run for tests: the demo's recipe scaled down (a narrower network, 64 training
images of ~128 px, 240 steps), trained from scratch and evaluated. Not meant to reach a useful mAP."""

from configs import demo


def get_config():
    config = demo.get_config()
    config.name = "smoke"
    m = config.model
    m.backbone.gn_groups = 8
    m.fpn.out_channels = 32
    m.head.feat_channels = 32
    m.head.stacked_convs = 1
    m.head.gn_groups = 8
    m.loss.box_loss = "l1"
    m.loss.box_weight = 1.0
    m.test.max_per_img = 50
    d = config.data
    d.root = "data/synthetic_smoke"
    d.synthetic.num_train = 64
    d.synthetic.num_val = 16
    d.synthetic.image_size = 128
    d.scale = (160, 128)
    d.landscape_canvas = (128, 160)
    d.portrait_canvas = (160, 128)
    d.max_boxes = 16
    config.optim.warmup_iters = 10
    config.optim.epochs = 30
    config.train.log_every = 8
    config.train.time_budget_s = None
    config.eval.max_vis_images = 2
    return config
