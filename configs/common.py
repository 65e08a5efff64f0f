"""Shared config blocks. Each config file's get_config() starts from `base_config()` and overrides.

Conventions (ml_collections): tuples, not lists; optional fields are typed placeholders; numbers derived
from others are FieldReferences, so a command-line override of the source moves them too.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def set_by_path(cfg, dotted: str, value) -> None:
    """Sets one field of a config, named by its dotted path, in place.

    Args:
      cfg: a ConfigDict (or nested dicts); a locked ConfigDict still refuses unknown fields and wrong types.
      dotted: the field's path from the root, e.g. 'train.compile' or 'model.backbone.channels_last'.
      value: the new value.

    Returns:
      None.

    Raises:
      KeyError (or AttributeError from a ConfigDict): a parent on the path does not exist.
    """
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    node[leaf] = value


def override(cfg, **dotted_values):
    """`set_by_path` for each keyword, in order; dotted paths go in as `**{'optim.lr': 0.01}`.

    Args:
      cfg: the config to edit in place.
      **dotted_values: dotted path -> new value.

    Returns:
      cfg itself, for chaining.
    """
    for dotted, value in dotted_values.items():
        set_by_path(cfg, dotted, value)
    return cfg


def backbone_config(depth: int = 50) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            depth=depth,
            style="pytorch",  # stride on the 3x3 conv; 'caffe' puts it on the first 1x1
            bn_eps=1e-5,
            norm="frozen_bn",  # 'frozen_bn' (stored statistics) | 'gn' (GroupNorm: training from scratch)
            gn_groups=32,
            base_width=64,  # stem and stage-1 channels; every standard ResNet uses 64
            frozen_stages=1,  # stem + layer1 frozen (-1: nothing frozen)
            norm_affine_trainable=True,  # mmdetection trains BN weight/bias; torchvision's FrozenBN does not
            pretrained=placeholder(str),  # a torchvision ResNet checkpoint (resnet50-*.pth)
            channels_last=False,
        )
    )


def model_config(depth: int = 50, num_classes: int | str = 80) -> ml_collections.ConfigDict:
    """mmdetection v2.9.0 retinanet_r50_fpn: the model, its anchors, coder, assigner, losses and
    test-time post-processing. num_classes: an int, or 'auto' (see base_config)."""
    return ml_collections.ConfigDict(
        dict(
            # An int or 'auto' (either may be given on the command line: the field's type is object).
            num_classes=config_dict.FieldReference(num_classes, field_type=object),
            backbone=backbone_config(depth),
            fpn=dict(
                out_channels=256,
                extra_source="input",  # P6 from C5 ('input', mmdetection) or from P5 ('output', torchvision v1)
                relu_before_extra=False,  # ReLU between P6 and P7 (torchvision v1: True)
            ),
            head=dict(
                feat_channels=256,
                stacked_convs=4,
                norm="none",  # 'none' | 'gn'
                gn_groups=32,
                prior_prob=0.01,
            ),
            anchors=dict(
                style="mmdet",  # 'mmdet' exact float sizes | 'torchvision' truncated sizes, rounded corners
                octave_base_scale=4.0,
                scales_per_octave=3,
                ratios=(0.5, 1.0, 2.0),  # h / w
                strides=(8, 16, 32, 64, 128),
            ),
            coder=dict(
                means=(0.0, 0.0, 0.0, 0.0),
                stds=(1.0, 1.0, 1.0, 1.0),
                scale_clamp=math.log(1000.0 / 16.0),
                clamp_lower=True,  # mmdetection clamps dw, dh on both sides; torchvision only above
            ),
            assigner=dict(
                pos_iou_thr=0.5,
                neg_iou_thr=0.4,
                min_pos_iou=0.0,
                match_low_quality=True,
                low_quality="mmdet",  # 'mmdet': tied anchors go to that gt, later gts win | 'torchvision'
                ignore_iof_thr=-1.0,  # > 0: anchors covered by a crowd box beyond this IoF are ignored
            ),
            loss=dict(
                focal_alpha=0.25,
                focal_gamma=2.0,
                fused_focal=False,  # True: one-pass loss and gradient over integer labels (retina_fn.focal_loss)
                cls_weight=1.0,
                box_loss="l1",  # 'l1' on deltas | 'giou' on decoded boxes
                box_weight=1.0,
                normalizer="batch",  # 'batch': sum_i max(pos_i, 1) (mmdetection) | 'image' (torchvision)
            ),
            test=dict(
                nms_pre=1000,  # per level, before NMS
                pre_select="anchor",  # 'anchor': top-k anchors by max class score (mmdetection) |
                # 'pair': score threshold then top-k (anchor, class) pairs (torchvision)
                score_thr=0.05,
                nms_iou=0.5,
                max_per_img=100,
                max_candidates=5000,  # static cap on (box, class) pairs entering NMS, see postprocess
                static_shapes=False,  # True: NMS always sees max_candidates rows (NPU, compiled inference)
            ),
            size_divisor=32,
            # A uint8 batch image (data.uint8_canvas) is normalised with these on the device
            # (retina_fn.model.inputs); base_config ties them to data.mean / data.std.
            pixel_mean=(123.675, 116.28, 103.53),
            pixel_std=(58.395, 57.12, 57.375),
            # True: each image's outputs equal those of the image padded alone to size_divisor, whatever
            # its canvas and batch companions (retina_fn.extent); False: the canvas's padding is seen.
            canvas_exact=True,
        )
    )


def data_config() -> ml_collections.ConfigDict:
    """COCO 2017 with mmdetection's 1x pipeline on fixed canvases (the Ascend port's static shapes)."""
    return ml_collections.ConfigDict(
        dict(
            dataset="coco",  # 'coco' (files under root) | 'synthetic' (generated under root when absent)
            root=placeholder(str),
            train_ann="annotations/instances_train2017.json",
            train_images="train2017",
            val_ann="annotations/instances_val2017.json",
            val_images="val2017",
            synthetic=dict(num_train=1500, num_val=200, seed=0, image_size=256, num_classes=5),
            mean=(123.675, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
            scale=(1333, 800),  # keep-ratio resize limits: (long side, short side)
            resize_mode="mmdet",  # 'mmdet': resize uint8 (size rounded), then normalise | 'torchvision':
            # normalise, then resize the float image (size floored); retina_fn.data.resize
            # True: the loader ships resized uint8 canvases (a quarter of the bytes), normalised on the device
            # into the same float32 image (retina_fn.model.inputs); 'mmdet' resize mode only
            uint8_canvas=False,
            flip_prob=0.5,
            landscape_canvas=(800, 1344),  # (H, W) for images with w > h
            portrait_canvas=(1344, 800),  # (H, W) for images with w <= h
            max_boxes=100,  # ground truth padded to this count; more boxes: see data.batching
            # Pad each batch's ground truth to the smallest of these (clipped to max_boxes) that holds its
            # largest count, one static shape per bucket; () pads to max_boxes. Same assignment and loss.
            box_buckets=(),
            max_ignore_boxes=20,
            filter_empty_gt=True,
            min_size=32,
            skip_bad_images=False,
            images_per_device=2,
            eval_images_per_device=2,
            # loader processes per training process: an int (0: load in the training process) or 'auto':
            # min(CPUs per local process - 1, 16) (retina_fn.data.loader.resolve_workers)
            workers=config_dict.FieldReference("auto", field_type=object),
            preload=False,  # decode every image once into memory (small datasets)
        )
    )


def optim_config() -> ml_collections.ConfigDict:
    """SGD with mmdetection's 1x schedule; lr follows the linear scaling rule from base_lr @ base_batch."""
    return ml_collections.ConfigDict(
        dict(
            name="sgd",  # 'sgd' | 'adamw'
            base_lr=0.01,
            base_batch=16,
            lr=placeholder(float),  # explicit lr; overrides the scaling rule
            momentum=0.9,
            nesterov=False,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=1e-4,
            decay_norm_and_bias=True,  # False: no weight decay on norms and biases
            clip_norm=placeholder(float),
            warmup_iters=500,
            warmup_ratio=0.001,
            schedule="step",  # 'step' (x gamma at step_epochs) | 'cosine'
            step_epochs=(8, 11),
            gamma=0.1,
            epochs=12,
            # loader batches accumulated into one update (the lr and schedule count the images): an int, or 'auto':
            # optim.global_batch / (images per device x processes present), derived at every (re)start
            accum_steps=config_dict.FieldReference(1, field_type=object),
            # images per update over all processes, the run's invariant across restarts and resizes (stored in
            # checkpoints); unset: images per device x processes x accum_steps (1 for 'auto') at the first start
            global_batch=placeholder(int),
            micro_batches=1,  # parts each loader batch is split into to save memory (the update is the same)
            backend="native",  # 'native' | 'apex' (fused SGD when NVIDIA or Ascend apex is installed)
        )
    )


def train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            precision="fp32",  # 'fp32' | 'fp16' (autocast + dynamic loss scaling) | 'bf16'
            opt_level=placeholder(str),  # apex-style 'O0' | 'O1' | 'O2'; maps onto precision
            loss_scale=dict(init=2.0**16, growth_interval=2000, factor=2.0, dynamic=True),
            # 'isfinite' | 'saturation' (Ascend 910A fp16 saturates) | 'npu' (torch_npu flag)
            overflow_check="isfinite",
            compile=False,  # torch.compile the train step
            # what train.compile compiles: 'step' (all of it) | 'gradients' (the update stays eager) | 'auto'
            # ('gradients' on CUDA with torch < 2.13, whose inductor fails on the foreach update: pytorch#176591)
            compile_scope="auto",
            cuda_graph=False,  # capture the train step and the eval forward as CUDA graphs (retina_fn.train.graph)
            max_nonfinite_steps=5,
            max_steps=placeholder(int),
            time_budget_s=placeholder(float),
            log_every=50,
            tensorboard=False,  # also write metrics.jsonl's records as TensorBoard scalars (needs tensorboard)
            eval_every_epochs=1,
            checkpoint_every_steps=placeholder(int),
            # also checkpoint after this many seconds of training since the last checkpoint (rank 0's clock decides)
            checkpoint_every_s=placeholder(float),
            keep_checkpoints=3,
            validate=True,
            performance_steps=placeholder(int),  # stop each epoch after this many steps (the seed's --performance)
        )
    )


def dist_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            device="auto",  # 'auto' | 'npu' | 'cuda' | 'cpu'
            timeout_s=1800.0,
            # the loss divisor of each replica: its own positives ('local': mmdetection 2.9 and torchvision divide
            # each GPU's loss by its own count) or the mean over replicas ('global': the update of one large batch)
            normalizer="local",
            bucket_mb=25.0,
        )
    )


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            name="retinanet",
            seed=0,
            # 'auto': the class count of the training annotation file (in evaluation: the validation file;
            # in prediction: the weights), resolved by the programs before the model is built
            # (retina_fn/class_count.py). Configs for published weights set their int.
            model=model_config(num_classes="auto"),
            data=data_config(),
            optim=optim_config(),
            train=train_config(),
            dist=dist_config(),
            # error_analysis: the COCO error breakdown after the final evaluation (retina_fn/engine/evaluation.py):
            # True / False always / never; unset: on sets of at most 1000 images (minutes on COCO val)
            eval=dict(max_vis_images=4, use_faster_coco_eval=True, error_analysis=placeholder(bool)),
        )
    )
    # One value each: what the loader normalises with is what the device normalises uint8 canvases with.
    config.model.pixel_mean = config.data.get_ref("mean")
    config.model.pixel_std = config.data.get_ref("std")
    return config
