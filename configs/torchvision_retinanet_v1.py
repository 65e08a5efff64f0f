"""torchvision's retinanet_resnet50_fpn (v1, RetinaNet_ResNet50_FPN_Weights.COCO_V1: 36.4 box AP) end to end:
model, anchors, matching, loss normaliser, post-processing, preprocessing and the training recipe of
torchvision's references/detection (26 epochs, lr 0.01 at batch 16, steps at 16 and 22, 1000 warmup iters).

What differs from mmdetection's retinanet_r50_fpn_1x (configs/common.py):
  - 91 sigmoid outputs indexed by COCO category id (index 0 and ten ids unused), not 80;
  - FrozenBN with eps 0 (the published weights' setting) and frozen affine; stem + layer1 frozen
    (trainable_backbone_layers=3);
  - P6 from P5 and a ReLU before P7; anchor sizes int-truncated with rounded corners;
  - box decoding clamps dw, dh from above only; low-quality matches go to the anchor's own best gt;
  - focal / L1 losses normalised per image; post-processing thresholds (anchor, class) pairs per level
    before its top-1000 and keeps 300 boxes;
  - preprocessing normalises, then resizes the float image (size floored), see
    retina_fn.data.resize.

Evaluate the published weights (no conversion step; the file is read directly):
    python -m experiments.coco_retinanet --config configs/torchvision_retinanet_v1.py \\
        --config.data.root=data/coco --config.model.num_classes=80 \\
        --mode eval --weights retinanet_resnet50_fpn_coco-eeacb38b.pth --workdir runs/tv_v1_eval
With model.num_classes=80 the loader keeps the checkpoint's 80 real COCO outputs (ids ascending, the
order of the COCO annotation file's label map); with 91 the label index is the COCO category id, which
is what experiments/predict.py writes.

Images sit on this project's fixed canvases (800 x 1344 / 1344 x 800) rather than each image's own size
rounded up to 32; with model.canvas_exact (the default) the network, the P6 / P7 anchor grid steps
(torchvision's padded size // feature size) and the post-processing follow each image's own padded size,
so `experiments.predict` and `--mode eval` give torchvision's detections on those canvases
(tests/test_golden_torchvision.py: every one of torchvision's top-100 detections has a twin on five images
of different sizes and aspect ratios). Training anchors use the canvas's grid, as torchvision's own
training uses the batch's padded size.
"""

from configs import common


def get_config():
    config = common.base_config()
    config.name = "torchvision_retinanet_v1"
    m = config.model
    m.num_classes = 91
    m.backbone.bn_eps = 0.0
    m.backbone.norm_affine_trainable = False
    m.backbone.frozen_stages = 1
    m.fpn.extra_source = "output"
    m.fpn.relu_before_extra = True
    m.anchors.style = "torchvision"
    m.coder.clamp_lower = False
    m.assigner.low_quality = "torchvision"
    m.loss.normalizer = "image"
    m.test.pre_select = "pair"
    m.test.nms_pre = 1000
    m.test.score_thr = 0.05
    m.test.nms_iou = 0.5
    m.test.max_per_img = 300
    m.test.max_candidates = 5 * 1000  # every level's top-1000 enters NMS, as in torchvision

    d = config.data
    d.root = "data/coco"
    d.resize_mode = "torchvision"
    d.scale = (1333, 800)  # max_size, min_size
    d.min_size = 0  # torchvision's references drop images without annotations only

    o = config.optim
    o.base_lr = 0.01
    o.base_batch = 16
    o.momentum = 0.9
    o.weight_decay = 1e-4
    o.warmup_iters = 1000
    o.warmup_ratio = 0.001
    o.schedule = "step"
    o.step_epochs = (16, 22)
    o.gamma = 0.1
    o.epochs = 26
    return config
