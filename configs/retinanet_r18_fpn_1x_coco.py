"""RetinaNet with a ResNet-18 backbone (mmdetection's later R-18 1x config: 31.7 AP); the FPN takes
C3..C5 with 128/256/512 channels."""

from configs import retinanet_r50_fpn_1x_coco


def get_config():
    config = retinanet_r50_fpn_1x_coco.get_config()
    config.name = "retinanet_r18_fpn_1x_coco"
    config.model.backbone.depth = 18
    return config
