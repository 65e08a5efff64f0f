"""The Ascend ModelZoo port of retinanet_r50_fpn_1x_coco (RetinaNet_for_PyTorch): 8 images per device,
lr 0.04 (what its train_full_1p.sh and train_full_8p.sh pass), gradient clipping at max norm 10, apex O1
mixed precision with a static loss scale of 64, log every 10 iterations. On an NPU the fused SGD of
Ascend apex is used when installed (optim.backend='apex'); elsewhere native SGD.

    bash scripts/train_full_1p.sh --data_path=/data/coco
    bash scripts/train_full_8p.sh --data_path=/data/coco
"""

from configs import retinanet_r50_fpn_1x_coco


def get_config():
    config = retinanet_r50_fpn_1x_coco.get_config()
    config.name = "retinanet_r50_fpn_1x_coco_npu"
    config.data.images_per_device = 8
    config.optim.lr = 0.04
    config.optim.clip_norm = 10.0
    config.train.opt_level = "O1"
    config.train.loss_scale.init = 64.0
    config.train.loss_scale.dynamic = False
    config.train.log_every = 10
    return config
