"""mmdetection v2.9.0 retinanet_r50_fpn_1x_coco: ResNet-50 (ImageNet backbone), FPN, 12 epochs of SGD at
lr 0.01 for 16 images (8 devices x 2), 1333 x 800 keep-ratio resize, horizontal flip.

    python -m experiments.coco_retinanet --config configs/retinanet_r50_fpn_1x_coco.py \\
        --config.data.root=data/coco --config.model.backbone.pretrained=resnet50-0676ba61.pth --workdir runs/r50_1x
    torchrun --nproc_per_node=8 -m experiments.coco_retinanet --config configs/retinanet_r50_fpn_1x_coco.py ...

With fewer devices the learning rate follows the linear scaling rule (optim.base_lr at optim.base_batch).
"""

from configs import common


def get_config():
    config = common.base_config()
    config.name = "retinanet_r50_fpn_1x_coco"
    config.model.num_classes = 80  # COCO's 80 categories, as the published weights (not 'auto')
    config.data.root = "data/coco"
    return config
