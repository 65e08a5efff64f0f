"""mmdetection v2.9.0 retinanet_r101_fpn_1x_coco (torchvision://resnet101 backbone; 38.5 AP)."""

from configs import retinanet_r50_fpn_1x_coco


def get_config():
    config = retinanet_r50_fpn_1x_coco.get_config()
    config.name = "retinanet_r101_fpn_1x_coco"
    config.model.backbone.depth = 101
    return config
