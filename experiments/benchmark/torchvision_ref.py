"""torchvision's RetinaNet R50-FPN as the reference subject of --compare torchvision: its model built to match
our config, and its train and infer steps on our batch (torchvision is imported only when used)."""

from __future__ import annotations

import torch

from experiments.benchmark.measurement import Subject, count_flops
from experiments.benchmark.options import Options
from retina_fn import precision as precision_lib

TV_VARIANTS = ("pretrained", "builder_defaults")


def torchvision_available() -> bool:
    """Whether torchvision can be compared with here.

    Returns:
      True when `import torchvision` works in this environment.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def torchvision_model(cfg, canvas: tuple[int, int], variant: str, device: torch.device, seed: int = 0):
    """torchvision's RetinaNet R50-FPN with our config's classes and P6 source, keeping `canvas` unresized.

    Args:
      cfg: our config (model.num_classes, model.backbone.depth/frozen_stages, model.fpn.extra_source).
      canvas: (H, W); min_size/max_size are set so torchvision's transform keeps it.
      variant: 'pretrained' (FrozenBatchNorm2d, our frozen stages: what the builder makes when handed
        ImageNet backbone weights, without loading any) or 'builder_defaults' (trainable BatchNorm2d, whole
        backbone trainable).
      device: where the model goes.
      seed: for torch's global generator, which torchvision's initialisers draw from.

    Returns:
      torchvision.models.detection.RetinaNet on `device`.

    Raises:
      ValueError: an unknown variant, or a backbone depth other than 50.
    """
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if variant not in TV_VARIANTS:
        raise ValueError(f"--tv-variant must be one of {TV_VARIANTS}, got {variant!r}")
    if cfg.model.backbone.depth != 50:
        raise ValueError(f"--compare torchvision needs model.backbone.depth=50, got {cfg.model.backbone.depth}")
    torch.manual_seed(seed)
    sizes = dict(min_size=min(canvas), max_size=max(canvas))
    if variant == "builder_defaults":
        model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=cfg.model.num_classes, **sizes)
    else:
        body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
        trainable_layers = 5 - (int(cfg.model.backbone.frozen_stages) + 1)
        p6_in = 2048 if cfg.model.fpn.extra_source == "input" else 256
        backbone = _resnet_fpn_extractor(body, trainable_layers, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(p6_in, 256))
        model = RetinaNet(backbone, cfg.model.num_classes, **sizes)
    return model.to(device)


def _prepared_model(cfg, batch: dict, opts: Options, device: torch.device):
    model = torchvision_model(cfg, tuple(batch["image"].shape[-2:]), opts.tv_variant, device, opts.seed)
    if opts.tv_channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _tv_inputs(batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """Our padded batch as torchvision's image list and per-image target dicts (real boxes only)."""
    images = list(batch["image"].unbind(0))
    targets = [{"boxes": b[v], "labels": lab[v]}
               for b, lab, v in zip(batch["boxes"], batch["labels"], batch["box_valid"])]
    return images, targets


def tv_train(cfg, batch: dict, opts: Options, device: torch.device) -> Subject:
    """torchvision's train step: model(images, targets) + backward + torch.optim.SGD step (the config's
    momentum and weight decay), with a GradScaler when the precision scales losses.

    Args:
      cfg: our config (its model fields, optim.momentum/weight_decay and train precision).
      batch: our static batch.
      opts: tv_variant, tv_channels_last, seed.
      device: where the model runs.

    Returns:
      The Subject named 'torchvision'; its FLOP count runs one forward + backward.
    """
    model = _prepared_model(cfg, batch, opts, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    prec = precision_lib.precision_from_config(cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.loss_scaling)
    images, targets = _tv_inputs(batch)

    def call():
        with precision_lib.autocast(prec, device.type):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    def flops():
        def forward_backward():
            with precision_lib.autocast(prec, device.type):
                loss = sum(model(images, targets).values())
            loss.backward()
        result = count_flops(forward_backward)
        optimizer.zero_grad(set_to_none=True)
        return result

    return Subject("torchvision", call, flops)


def tv_infer(cfg, batch: dict, opts: Options, device: torch.device) -> Subject:
    """torchvision's inference: model.eval() forward with its transform and post-processing (score 0.05, top
    1000 per level, NMS 0.5, 300 detections per image).

    Args:
      cfg: our config.
      batch: our static batch.
      opts: tv_variant, tv_channels_last, dense_scores (zero classification bias), seed.
      device: where the model runs.

    Returns:
      The Subject named 'torchvision'; its FLOP count runs one call.
    """
    model = _prepared_model(cfg, batch, opts, device)
    model.eval()
    if opts.dense_scores:
        with torch.no_grad():
            model.head.classification_head.cls_logits.bias.zero_()
    prec = precision_lib.precision_from_config(cfg.train)
    images, _ = _tv_inputs(batch)

    @torch.no_grad()
    def call():
        with precision_lib.autocast(prec, device.type):
            return model(images)

    return Subject("torchvision", call, lambda: count_flops(call))
