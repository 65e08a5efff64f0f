"""RetinaNet R50-FPN with mmdetection's 1x recipe for a COCO-format dataset of your own (README: "Train on your
own COCO-format dataset"). The class count and label map come from the training annotation file
(model.num_classes='auto'); data.root and the four file fields name the files:

    python -m experiments.coco_retinanet --config configs/own_dataset.py --workdir runs/mydata \\
        --config.data.root=data/mydata --config.model.backbone.pretrained=resnet50-0676ba61.pth

data.root has no default: a run without it stops with "data.root is not set".
"""

from configs import retinanet_r50_fpn_1x_coco


def get_config():
    config = retinanet_r50_fpn_1x_coco.get_config()
    config.name = "retinanet_r50_fpn_1x_own_dataset"
    config.model.num_classes = "auto"
    d = config.data
    d.root = None
    d.train_ann = "annotations/instances_train.json"
    d.train_images = "train"
    d.val_ann = "annotations/instances_val.json"
    d.val_images = "val"
    return config
