"""What a config may hold: every field checked once, at start, and the typed settings the library runs on built
from the checked config.

    schema.check_config(cfg)                       # every field; one ConfigError naming each --config.<field>
    spec = schema.detector_spec(cfg, label_map)    # retina_fn.spec.DetectorSpec (what travels with the weights)
    settings = schema.step_settings(cfg)           # retina_fn.train.settings.StepSettings (the train step's)
    spec = schema.spec_from_json(obj, source)      # a stored spec, checked by the same rules

This is the one module that knows the config's schema. The library below it takes the typed specs (or plain
arguments) and trusts them; the data pipeline reads its checked `data` block. A config field's rule is a
function of its value (`_RULES`), and the rules that tie fields together follow (`_cross_checks`); a stored spec is
checked by the rules of the config fields it came from (retina_fn.spec.config_path), so a checkpoint or an export
folder can never hold a value a config could not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from retina_fn import errors
from retina_fn import spec as spec_lib
from retina_fn.optim import OptimSettings
from retina_fn.precision import OPT_LEVELS, LossScaleSettings
from retina_fn.train import StepSettings

Rule = Callable[[Any], "str | None"]  # a field's value -> what is wrong with it, None when it is fine


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _maybe(rule: Rule, optional: bool) -> Rule:
    """`rule`, or None allowed too."""
    if not optional:
        return rule
    return lambda v: None if v is None else (p + " (or None)" if (p := rule(v)) else None)


def integer(low: int | None = None, high: int | None = None, optional: bool = False) -> Rule:
    bounds = f" in {low}..{high}" if high is not None else (f" >= {low}" if low is not None else "")
    return _maybe(lambda v: None if _is_int(v) and (low is None or v >= low) and (high is None or v <= high)
                  else f"must be an integer{bounds}", optional)


def number(low: float | None = None, high: float | None = None, *, above: bool = False, below: bool = False,
           optional: bool = False) -> Rule:
    """A finite number within [low, high] (`above` / `below`: strictly)."""
    limits = [f"{'>' if above else '>='} {low}"] if low is not None else []
    limits += [f"{'<' if below else '<='} {high}"] if high is not None else []
    message = "must be a finite number" + (" " + " and ".join(limits) if limits else "")
    return _maybe(lambda v: None if _is_number(v) and (low is None or (v > low if above else v >= low)) and (
        high is None or (v < high if below else v <= high)) else message, optional)


def boolean(optional: bool = False) -> Rule:
    return _maybe(lambda v: None if isinstance(v, bool) else "must be True or False", optional)


def text(optional: bool = False) -> Rule:
    return _maybe(lambda v: None if isinstance(v, str) else "must be a string", optional)


def choice(*options) -> Rule:
    return lambda v: None if v in options and not isinstance(v, bool) else f"must be one of {options}"


def sequence(item: Rule, length: int | None = None, nonempty: bool = False, increasing: bool = False) -> Rule:
    def rule(v):
        if not isinstance(v, (tuple, list)) or (length is not None and len(v) != length) or (nonempty and not v):
            return "must be a tuple of " + (f"{length} values" if length else "values") + (
                " (at least one)" if nonempty else "")
        problem = next((p for p in map(item, v) if p), None)
        if problem:
            return f"each value {problem}"
        return "must be increasing" if increasing and list(v) != sorted(set(v)) else None
    return rule


def either(*rules: Rule) -> Rule:
    return lambda v: None if any(r(v) is None for r in rules) else " or ".join(r(v) for r in rules)


def power_of_two(v) -> str | None:
    return None if _is_int(v) and v >= 1 and v & (v - 1) == 0 else "must be a power of two"


PROBABILITY = number(0.0, 1.0)
SIZE = sequence(integer(1), length=2)

_RULES: dict[str, Rule] = {
    "name": text(),
    "seed": integer(0, 2**63 - 1),
    "model.num_classes": either(integer(1), choice("auto")),
    "model.backbone.depth": choice(18, 34, 50, 101, 152),
    "model.backbone.style": choice("pytorch", "caffe"),
    "model.backbone.bn_eps": number(0.0),
    "model.backbone.norm": choice("frozen_bn", "gn"),
    "model.backbone.gn_groups": integer(1),
    "model.backbone.base_width": integer(1),
    "model.backbone.frozen_stages": integer(-1, 4),
    "model.backbone.norm_affine_trainable": boolean(),
    "model.backbone.pretrained": text(optional=True),
    "model.backbone.channels_last": boolean(),
    "model.fpn.out_channels": integer(1),
    "model.fpn.extra_source": choice("input", "output"),
    "model.fpn.relu_before_extra": boolean(),
    "model.head.feat_channels": integer(1),
    "model.head.stacked_convs": integer(0),
    "model.head.norm": choice("none", "gn"),
    "model.head.gn_groups": integer(1),
    "model.head.prior_prob": number(0.0, 1.0, above=True, below=True),
    "model.anchors.style": choice("mmdet", "torchvision"),
    "model.anchors.octave_base_scale": number(0.0, above=True),
    "model.anchors.scales_per_octave": integer(1),
    "model.anchors.ratios": sequence(number(0.0, above=True), nonempty=True),
    "model.anchors.strides": sequence(power_of_two, nonempty=True, increasing=True),
    "model.coder.means": sequence(number(), length=4),
    "model.coder.stds": sequence(number(0.0, above=True), length=4),
    "model.coder.scale_clamp": number(0.0, above=True),
    "model.coder.clamp_lower": boolean(),
    "model.assigner.pos_iou_thr": PROBABILITY,
    "model.assigner.neg_iou_thr": PROBABILITY,
    "model.assigner.min_pos_iou": PROBABILITY,
    "model.assigner.match_low_quality": boolean(),
    "model.assigner.low_quality": choice("mmdet", "torchvision"),
    "model.assigner.ignore_iof_thr": number(high=1.0),
    "model.loss.focal_alpha": PROBABILITY,
    "model.loss.focal_gamma": number(0.0),
    "model.loss.fused_focal": boolean(),
    "model.loss.cls_weight": number(0.0),
    "model.loss.box_loss": choice("l1", "giou"),
    "model.loss.box_weight": number(0.0),
    "model.loss.normalizer": choice("batch", "image"),
    "model.test.nms_pre": integer(),
    "model.test.pre_select": choice("anchor", "pair"),
    "model.test.score_thr": PROBABILITY,
    "model.test.nms_iou": PROBABILITY,
    "model.test.max_per_img": integer(1),
    "model.test.max_candidates": integer(),
    "model.test.static_shapes": boolean(),
    "model.size_divisor": integer(1),
    "model.canvas_exact": boolean(),
    "model.pixel_mean": sequence(number(), length=3),
    "model.pixel_std": sequence(number(0.0, above=True), length=3),
    "data.dataset": choice("coco", "synthetic"),
    "data.root": text(optional=True),
    "data.train_ann": text(),
    "data.train_images": text(),
    "data.val_ann": text(),
    "data.val_images": text(),
    "data.synthetic.num_train": integer(0),
    "data.synthetic.num_val": integer(0),
    "data.synthetic.seed": integer(0),
    "data.synthetic.image_size": integer(64),
    "data.synthetic.num_classes": integer(1),
    "data.mean": sequence(number(), length=3),
    "data.std": sequence(number(0.0, above=True), length=3),
    "data.scale": SIZE,
    "data.resize_mode": choice("mmdet", "torchvision"),
    "data.uint8_canvas": boolean(),
    "data.flip_prob": PROBABILITY,
    "data.landscape_canvas": SIZE,
    "data.portrait_canvas": SIZE,
    "data.max_boxes": integer(1),
    "data.box_buckets": sequence(integer(1), increasing=True),
    "data.max_ignore_boxes": integer(0),
    "data.filter_empty_gt": boolean(),
    "data.min_size": number(0.0),
    "data.skip_bad_images": boolean(),
    "data.images_per_device": integer(1),
    "data.eval_images_per_device": integer(1),
    "data.workers": either(integer(0), choice("auto")),
    "data.preload": boolean(),
    "optim.name": choice("sgd", "adamw"),
    "optim.base_lr": number(0.0, above=True),
    "optim.base_batch": integer(1),
    "optim.lr": number(0.0, above=True, optional=True),
    "optim.momentum": number(0.0, 1.0, below=True),
    "optim.nesterov": boolean(),
    "optim.betas": sequence(number(0.0, 1.0, below=True), length=2),
    "optim.eps": number(0.0),
    "optim.weight_decay": number(0.0),
    "optim.decay_norm_and_bias": boolean(),
    "optim.clip_norm": number(0.0, above=True, optional=True),
    "optim.warmup_iters": integer(0),
    "optim.warmup_ratio": PROBABILITY,
    "optim.schedule": choice("step", "cosine"),
    "optim.step_epochs": sequence(integer(0), increasing=True),
    "optim.gamma": number(0.0, above=True),
    "optim.epochs": integer(1),
    "optim.accum_steps": either(integer(1), choice("auto")),
    "optim.global_batch": integer(1, optional=True),
    "optim.micro_batches": integer(1),
    "optim.backend": choice("native", "apex"),
    "train.precision": choice("fp32", "fp16", "bf16"),
    "train.opt_level": either(choice("O0", "O1", "O2", ""), lambda v: None if v is None else "must be unset"),
    "train.loss_scale.init": number(0.0, above=True),
    "train.loss_scale.growth_interval": integer(1),
    "train.loss_scale.factor": number(1.0, above=True),
    "train.loss_scale.dynamic": boolean(),
    "train.overflow_check": choice("isfinite", "saturation", "npu"),
    "train.compile": boolean(),
    "train.compile_scope": choice("auto", "step", "gradients"),
    "train.cuda_graph": boolean(),
    "train.max_nonfinite_steps": integer(1),
    "train.max_steps": integer(1, optional=True),
    "train.time_budget_s": number(0.0, above=True, optional=True),
    "train.log_every": integer(1),
    "train.tensorboard": boolean(),
    "train.eval_every_epochs": integer(1),
    "train.checkpoint_every_steps": integer(1, optional=True),
    "train.checkpoint_every_s": number(0.0, above=True, optional=True),
    "train.keep_checkpoints": integer(1),
    "train.validate": boolean(),
    "train.performance_steps": integer(1, optional=True),
    "dist.device": choice("auto", "npu", "cuda", "cpu"),
    "dist.timeout_s": number(0.0, above=True),
    "dist.normalizer": choice("local", "global"),
    "dist.bucket_mb": number(0.0, above=True),
    "eval.max_vis_images": integer(0),
    "eval.use_faster_coco_eval": boolean(),
    "eval.error_analysis": boolean(optional=True),
}


def _get(node, path: str):
    """The value at a dotted path of nested mappings or attribute objects; KeyError when a part is absent."""
    for part in path.split("."):
        if isinstance(node, dict):
            node = node[part]
        elif hasattr(node, "keys") and part in node.keys():
            node = node[part]
        else:
            raise KeyError(path)
    return node


def _shown(value) -> str:
    text_ = repr(tuple(value) if isinstance(value, list) else value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."


def _problems(get: Callable[[str], Any], paths, where: Callable[[str], str]) -> dict[str, str]:
    """{path: 'where=value: what is wrong'} for the fields at `paths` that break their own rule."""
    found = {}
    for path in paths:
        try:
            value = get(path)
        except KeyError:
            continue
        problem = _RULES[path](value)
        if problem:
            found[path] = f"{where(path)}={_shown(value)}: {problem}"
    return found


def _stage_widths(base_width: int) -> tuple[int, ...]:
    return tuple(base_width * m for m in (1, 2, 4, 8))


def _cross_problems(get: Callable[[str], Any], where: Callable[[str], str], failed) -> list[str]:
    """The rules that tie fields together, on the fields that passed their own rule (not those in `failed`)."""
    found = []

    def has(*paths):
        if any(p in failed for p in paths):
            return None
        try:
            return [get(p) for p in paths]
        except KeyError:
            return None

    def bad(path, message):
        found.append(f"{where(path)}={_shown(get(path))}: {message}")

    norm = has("model.backbone.norm", "model.backbone.gn_groups", "model.backbone.base_width")
    if norm and norm[0] == "gn" and any(w % norm[1] for w in _stage_widths(norm[2])):
        bad("model.backbone.gn_groups", f"must divide every stage width {_stage_widths(norm[2])}")
    head = has("model.head.norm", "model.head.gn_groups", "model.head.feat_channels")
    if head and head[0] == "gn" and head[2] % head[1]:
        bad("model.head.gn_groups", f"must divide model.head.feat_channels={head[2]}")
    thresholds = has("model.assigner.neg_iou_thr", "model.assigner.pos_iou_thr")
    if thresholds and thresholds[0] > thresholds[1]:
        bad("model.assigner.neg_iou_thr", f"must be <= model.assigner.pos_iou_thr={thresholds[1]}")
    divisor = has("model.size_divisor")
    for name in ("data.landscape_canvas", "data.portrait_canvas"):
        canvas = has(name)
        if divisor and canvas and any(v % divisor[0] for v in canvas[0]):
            bad(name, f"(H, W) must be multiples of model.size_divisor={divisor[0]}")
    fit = has("data.scale", "data.landscape_canvas", "data.portrait_canvas")
    if fit:  # the largest resized image: (short limit, long limit) of data.scale, landscape or portrait
        long_max, short_max = max(fit[0]), min(fit[0])
        for name, canvas, need in (("data.landscape_canvas", fit[1], (short_max, long_max)),
                                   ("data.portrait_canvas", fit[2], (long_max, short_max))):
            if canvas[0] < need[0] or canvas[1] < need[1]:
                bad(name, f"(H, W) cannot hold every image resized with data.scale={tuple(fit[0])}: it needs at "
                          f"least {need}")
    uint8 = has("data.uint8_canvas", "data.resize_mode")
    if uint8 and uint8[0] and uint8[1] != "mmdet":
        bad("data.uint8_canvas", "needs data.resize_mode='mmdet' (the uint8 image is resized before it is normalised)")
    micro = has("optim.micro_batches", "data.images_per_device")
    if micro and micro[1] % micro[0]:
        bad("optim.micro_batches", f"must divide data.images_per_device={micro[1]}")
    apex = has("optim.backend", "optim.name")
    if apex and apex[0] == "apex" and apex[1] != "sgd":
        bad("optim.backend", "'apex' provides fused SGD only (optim.name='sgd')")
    nesterov = has("optim.nesterov", "optim.momentum")
    if nesterov and nesterov[0] and not nesterov[1] > 0:
        bad("optim.nesterov", "needs optim.momentum > 0")
    level = has("train.opt_level", "train.precision")
    if level and level[0] not in (None, "") and level[1] not in ("fp32", OPT_LEVELS[level[0]]):
        bad("train.opt_level", f"means precision {OPT_LEVELS[level[0]]!r}, but train.precision={level[1]!r}; set "
                               f"only one of them")
    return found


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise errors.ConfigError(f"{what}: " + "; ".join(problems) if what else "; ".join(problems))


def _flag(path: str) -> str:
    return f"--config.{path}"


def check_config(cfg) -> None:
    """Checks every field of a config against its rule and the rules that tie fields together.

    Args:
      cfg: the whole config (a ConfigDict, or nested mappings); fields a config lacks are not checked.

    Raises:
      ConfigError: one line naming each field at fault as `--config.<path>=<value>: <what is wrong>`.
    """
    def get(path):
        return _get(cfg, path)

    problems = _problems(get, _RULES, _flag)
    _raise(list(problems.values()) + _cross_problems(get, _flag, problems), "")


def precision_name(train_cfg) -> str:
    """'fp32' | 'fp16' | 'bf16': train.opt_level when set (apex's O0 -> fp32, O1 and O2 -> fp16), else
    train.precision. '' counts as unset: a command line cannot set a placeholder back to None, so
    `--config.train.opt_level=` is how an opt level a config file sets is cleared (scripts/common.sh)."""
    if train_cfg.opt_level in (None, ""):
        return train_cfg.precision
    return OPT_LEVELS[train_cfg.opt_level]


def step_settings(cfg) -> StepSettings:
    """The train step's settings of a config (checked with `check_config` here).

    Raises:
      ConfigError: as `check_config`.
    """
    check_config(cfg)
    t = cfg.train
    return StepSettings(optim=OptimSettings(**_fields(OptimSettings, cfg.optim)), precision=precision_name(t),
                        loss_scale=LossScaleSettings(**_fields(LossScaleSettings, t.loss_scale)),
                        overflow_check=t.overflow_check, clip_norm=cfg.optim.clip_norm,
                        micro_batches=int(cfg.optim.micro_batches), normalizer=cfg.dist.normalizer,
                        compile=bool(t.compile), compile_scope=t.compile_scope, cuda_graph=bool(t.cuda_graph))


def _fields(cls, node) -> dict:
    return {f.name: _frozen(node[f.name]) for f in dataclasses.fields(cls)}


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (tuple, list)) else value


def detector_spec(cfg, category_ids=None, names=None) -> spec_lib.DetectorSpec:
    """The DetectorSpec of a config whose model.num_classes is an int (experiments resolve 'auto' first).

    Args:
      cfg: the whole config (model and data blocks), checked with `check_config` here.
      category_ids, names: the annotation file's label map (K each); None: COCO's for 80 and 91 classes, ids
        1..K otherwise (retina_fn.interop.coco_names.label_map_for).

    Returns:
      The spec, checked.

    Raises:
      ConfigError: as `check_config`, or model.num_classes still 'auto', or a label map of another length.
    """
    from retina_fn.interop.coco_names import label_map_for  # noqa: PLC0415 - interop sits above

    check_config(cfg)
    m, d = cfg.model, cfg.data
    if not _is_int(m.num_classes):
        raise errors.ConfigError("model.num_classes is 'auto': resolve it from the data or the weights first "
                                 "(retina_fn.class_count)")
    if category_ids is None:
        category_ids, names = label_map_for(int(m.num_classes))
    if len(category_ids) != m.num_classes or len(names) != m.num_classes:
        raise errors.ConfigError(f"model.num_classes={m.num_classes} but the label map has {len(category_ids)} "
                                 f"classes")
    parts = {name: cls(**_fields(cls, d if name == "input" else m[name])) for name, cls in spec_lib.PARTS.items()}
    return spec_lib.DetectorSpec(num_classes=int(m.num_classes), category_ids=tuple(int(i) for i in category_ids),
                                 names=tuple(str(n) for n in names), size_divisor=int(m.size_divisor),
                                 canvas_exact=bool(m.canvas_exact), **parts)


def spec_problems(spec: spec_lib.DetectorSpec) -> list[str]:
    """What is wrong with a spec by the rules of the config fields it mirrors ([] when nothing)."""
    values = {spec_lib.config_path(k): v for k, v in spec_lib.flat(spec).items()}
    values["model.pixel_mean"], values["model.pixel_std"] = spec.input.mean, spec.input.std

    def get(path):
        if path not in values:
            raise KeyError(path)
        return values[path]

    own = _problems(get, [p for p in _RULES if p in values], lambda p: p)
    problems = list(own.values()) + _cross_problems(get, lambda p: p, own)
    if spec.num_classes == "auto":
        problems.append("model.num_classes='auto': a spec holds the resolved class count")
    if len(spec.category_ids) != spec.num_classes or len(spec.names) != spec.num_classes:
        problems.append(f"the label map has {len(spec.category_ids)} ids and {len(spec.names)} names for "
                        f"{spec.num_classes} classes")
    return problems


def spec_from_json(obj, source: str) -> spec_lib.DetectorSpec:
    """A stored spec (a checkpoint's or an export folder's), read and checked.

    Args:
      obj: `DetectorSpec.to_json`'s data.
      source: the file it came from, for the message.

    Raises:
      InputFormatError: not a spec of this format and version, fields missing or unknown, or values no config
        could hold (each named).
    """
    try:
        spec = spec_lib.from_json(obj)
    except (spec_lib.SpecFormatError, TypeError) as e:
        raise errors.InputFormatError(f"{source}: the stored detector spec is unreadable: {e}") from None
    problems = spec_problems(spec)
    if problems:
        raise errors.InputFormatError(f"{source}: the stored detector spec is invalid: {'; '.join(problems)}")
    return spec
