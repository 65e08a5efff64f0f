"""What the benchmark times: our train and eval steps of a config, and torchvision's RetinaNet built to match
(imported only when used). A Subject's FLOP count runs one eager step; its check compares with the eager step."""

from __future__ import annotations

import torch

from experiments.benchmark import parity
from experiments.benchmark.measurement import Subject, count_flops
from retina_fn import precision as precision_lib
from retina_fn import rng, schema
from retina_fn.errors import ConfigError
from retina_fn.train import build_optimizer, full_params, init_train_state, make_eval_step, make_train_step


STEPS_PER_EPOCH = 1000  # fixes the lr schedule only; the benchmark never reaches an epoch boundary


def _eager(cfg):
    """A copy of the config with nothing compiled or captured."""
    eager = cfg.copy_and_resolve_references()
    eager.train.compile = eager.train.cuda_graph = False
    return eager


def ours_train(cfg, batch: dict, device: torch.device, seed: int = 0, name: str = "ours") -> Subject:
    """make_train_step (compiled / graphed as the config says), stepping one state forward on every call on the
    static `batch`; seed: of the initial state."""
    global_batch = batch["image"].shape[0]
    spec, settings = schema.detector_spec(cfg), schema.step_settings(cfg)
    optimizer = build_optimizer(settings)

    def build(c):
        return make_train_step(spec, schema.step_settings(c), optimizer, steps_per_epoch=STEPS_PER_EPOCH,
                               global_batch=global_batch, device=device)

    def fresh():
        return init_train_state(spec, settings, rng.key(seed), optimizer, device=device)

    initial = fresh()  # the pure step leaves it as it is
    state, step = {"s": initial}, build(cfg)

    def call():
        state["s"], metrics = step(state["s"], batch)
        return metrics

    def flops():
        eager = build(_eager(cfg))
        return count_flops(lambda: eager(state["s"], batch))

    def check(steps):
        start = fresh() if optimizer.inplace else initial
        return parity.compare_train(step, build(_eager(cfg)), start, batch, steps,
                                    parity.TOLERANCES[schema.precision_name(cfg.train)])

    return Subject(name, call, flops, check if cfg.train.compile or cfg.train.cuda_graph else None)


def _fresh_params(cfg, device: torch.device, seed: int) -> dict:
    """Fresh full parameters with a zero classification bias: every (anchor, class) passes the score threshold."""
    settings = schema.step_settings(cfg)
    params = full_params(init_train_state(schema.detector_spec(cfg), settings, rng.key(seed), build_optimizer(settings),
                                          device=device))
    head = dict(params["head"])
    head["cls_logits"] = dict(head["cls_logits"], bias=torch.zeros_like(head["cls_logits"]["bias"]))
    return dict(params, head=head)


def _eval_step(cfg, device):
    return make_eval_step(schema.detector_spec(cfg), device, precision_name=schema.precision_name(cfg.train),
                          cuda_graph=bool(cfg.train.cuda_graph))


def ours_infer(cfg, batch: dict, device: torch.device, seed: int = 0, name: str = "ours") -> Subject:
    """make_eval_step on `_fresh_params`, torch.compile'd with train.compile (ConfigError with cuda_graph too)."""
    if cfg.train.compile and cfg.train.cuda_graph:
        raise ConfigError("--mode infer: train.compile and train.cuda_graph together are not supported (the "
                          "compiled eval step would trace the graph's runner); choose one")
    params = _fresh_params(cfg, device, seed)
    eval_step = _eval_step(cfg, device)
    timed = torch.compile(eval_step) if cfg.train.compile else eval_step

    def check(steps):
        return parity.compare_infer(timed, _eval_step(_eager(cfg), device), params, batch,
                                    parity.TOLERANCES[schema.precision_name(cfg.train)])

    return Subject(name, lambda: timed(params, batch),
                   lambda: count_flops(lambda: _eval_step(_eager(cfg), device)(params, batch)),
                   check if cfg.train.compile or cfg.train.cuda_graph else None)


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def torchvision_model(cfg, canvas: tuple[int, int], device: torch.device, seed: int = 0):
    """torchvision's RetinaNet R50-FPN as `retinanet_resnet50_fpn` builds it with ImageNet backbone weights
    (FrozenBatchNorm2d; the config's frozen stages, classes and P6 source), none loaded, keeping `canvas` (H, W);
    ConfigError for a backbone depth other than 50."""
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if cfg.model.backbone.depth != 50:
        raise ConfigError(f"--compare torchvision needs model.backbone.depth=50, got {cfg.model.backbone.depth}")
    torch.manual_seed(seed)
    body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    p6_in = 2048 if cfg.model.fpn.extra_source == "input" else 256
    backbone = _resnet_fpn_extractor(body, 5 - (int(cfg.model.backbone.frozen_stages) + 1), returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(p6_in, 256))
    return RetinaNet(backbone, cfg.model.num_classes, min_size=min(canvas), max_size=max(canvas)).to(device)


def tv_train(cfg, batch: dict, device: torch.device, seed: int = 0) -> Subject:
    """torchvision's train step: forward, backward, SGD (the config's momentum and weight decay), a GradScaler
    where the precision scales losses; the same batch, real boxes only."""
    model = torchvision_model(cfg, tuple(batch["image"].shape[-2:]), device, seed).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    prec = precision_lib.precision_from_name(schema.precision_name(cfg.train))
    scaler = torch.amp.GradScaler(device.type, enabled=prec.loss_scaling)
    images = list(batch["image"].unbind(0))
    targets = [{"boxes": b[v], "labels": lab[v]} for b, lab, v in zip(batch["boxes"], batch["labels"],
                                                                        batch["box_valid"])]

    def loss():
        with precision_lib.autocast(prec, device.type):
            return sum(model(images, targets).values())

    def call():
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss()).backward()
        scaler.step(optimizer)
        scaler.update()

    def flops():
        count = count_flops(lambda: loss().backward())
        optimizer.zero_grad(set_to_none=True)
        return count

    return Subject("torchvision", call, flops)


def tv_infer(cfg, batch: dict, device: torch.device, seed: int = 0) -> Subject:
    """torchvision's inference (its transform and post-processing), zero classification bias as ours."""
    model = torchvision_model(cfg, tuple(batch["image"].shape[-2:]), device, seed).eval()
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.zero_()
    prec = precision_lib.precision_from_name(schema.precision_name(cfg.train))
    images = list(batch["image"].unbind(0))

    @torch.no_grad()
    def call():
        with precision_lib.autocast(prec, device.type):
            return model(images)

    return Subject("torchvision", call, lambda: count_flops(call))
