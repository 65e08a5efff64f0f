"""The config's schema: every field checked once, at start, and the typed specs built from the checked config.

The one module that knows the schema; the library below trusts the specs it builds. Each field has a rule of its
value (`_RULES`), then come the rules that tie fields together (`_cross_problems`). A stored spec is checked by the
rules of the config fields it mirrors (retina_fn.spec.config_path), so a checkpoint or export holds no value a
config could not.
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


def _under(prefix: str, **rules: Rule) -> dict[str, Rule]:
    return {f"{prefix}.{name}": rule for name, rule in rules.items()}


PROBABILITY = number(0.0, 1.0)
SIZE = sequence(integer(1), length=2)

_RULES: dict[str, Rule] = {
    "name": text(),
    "seed": integer(0, 2**63 - 1),
    "model.num_classes": either(integer(1), choice("auto")),
    **_under("model.backbone", depth=choice(18, 34, 50, 101, 152), style=choice("pytorch", "caffe"), bn_eps=number(0.0),
                               norm=choice("frozen_bn", "gn"), gn_groups=integer(1), base_width=integer(1),
                               frozen_stages=integer(-1, 4), norm_affine_trainable=boolean(),
                               pretrained=text(optional=True), channels_last=boolean()),
    **_under("model.fpn", out_channels=integer(1), extra_source=choice("input", "output"), relu_before_extra=boolean()),
    **_under("model.head", feat_channels=integer(1), stacked_convs=integer(0), norm=choice("none", "gn"),
                           gn_groups=integer(1), prior_prob=number(0.0, 1.0, above=True, below=True)),
    **_under("model.anchors", style=choice("mmdet", "torchvision"), octave_base_scale=number(0.0, above=True),
                              scales_per_octave=integer(1), ratios=sequence(number(0.0, above=True), nonempty=True),
                              strides=sequence(power_of_two, nonempty=True, increasing=True)),
    **_under("model.coder", means=sequence(number(), length=4), stds=sequence(number(0.0, above=True), length=4),
                            scale_clamp=number(0.0, above=True), clamp_lower=boolean()),
    **_under("model.assigner", pos_iou_thr=PROBABILITY, neg_iou_thr=PROBABILITY, min_pos_iou=PROBABILITY,
                               match_low_quality=boolean(), low_quality=choice("mmdet", "torchvision"),
                               ignore_iof_thr=number(high=1.0)),
    **_under("model.loss", focal_alpha=PROBABILITY, focal_gamma=number(0.0), fused_focal=boolean(),
                           cls_weight=number(0.0), box_loss=choice("l1", "giou"), box_weight=number(0.0),
                           normalizer=choice("batch", "image")),
    **_under("model.test", nms_pre=integer(), pre_select=choice("anchor", "pair"), score_thr=PROBABILITY,
                           nms_iou=PROBABILITY, max_per_img=integer(1), max_candidates=integer(),
                           static_shapes=boolean()),
    **_under("model", size_divisor=integer(1), canvas_exact=boolean(), pixel_mean=sequence(number(), length=3),
                      pixel_std=sequence(number(0.0, above=True), length=3)),
    **_under("data", dataset=choice("coco", "synthetic"), root=text(optional=True), train_ann=text(),
                     train_images=text(), val_ann=text(), val_images=text()),
    **_under("data.synthetic", num_train=integer(0), num_val=integer(0), seed=integer(0), image_size=integer(64),
                               num_classes=integer(1)),
    **_under("data", mean=sequence(number(), length=3), std=sequence(number(0.0, above=True), length=3), scale=SIZE,
                     resize_mode=choice("mmdet", "torchvision"), uint8_canvas=boolean(), flip_prob=PROBABILITY,
                     landscape_canvas=SIZE, portrait_canvas=SIZE, max_boxes=integer(1),
                     box_buckets=sequence(integer(1), increasing=True), max_ignore_boxes=integer(0),
                     filter_empty_gt=boolean(), min_size=number(0.0), skip_bad_images=boolean(),
                     images_per_device=integer(1), eval_images_per_device=integer(1),
                     workers=either(integer(0), choice("auto")), preload=boolean()),
    **_under("optim", name=choice("sgd", "adamw"), base_lr=number(0.0, above=True), base_batch=integer(1),
                      lr=number(0.0, above=True, optional=True), momentum=number(0.0, 1.0, below=True),
                      nesterov=boolean(), betas=sequence(number(0.0, 1.0, below=True), length=2), eps=number(0.0),
                      weight_decay=number(0.0), decay_norm_and_bias=boolean(),
                      clip_norm=number(0.0, above=True, optional=True), warmup_iters=integer(0),
                      warmup_ratio=PROBABILITY, schedule=choice("step", "cosine"),
                      step_epochs=sequence(integer(0), increasing=True), gamma=number(0.0, above=True),
                      epochs=integer(1), accum_steps=either(integer(1), choice("auto")),
                      global_batch=integer(1, optional=True), micro_batches=integer(1),
                      backend=choice("native", "apex")),
    **_under("train", precision=choice("fp32", "fp16", "bf16"),
                      opt_level=either(choice("O0", "O1", "O2", ""), lambda v: None if v is None else "must be unset")),
    **_under("train.loss_scale", init=number(0.0, above=True), growth_interval=integer(1),
                                 factor=number(1.0, above=True), dynamic=boolean()),
    **_under("train", overflow_check=choice("isfinite", "saturation", "npu"), compile=boolean(),
                      compile_scope=choice("auto", "step", "gradients"), cuda_graph=boolean(),
                      max_nonfinite_steps=integer(1), max_steps=integer(1, optional=True),
                      time_budget_s=number(0.0, above=True, optional=True), log_every=integer(1), tensorboard=boolean(),
                      eval_every_epochs=integer(1), checkpoint_every_steps=integer(1, optional=True),
                      checkpoint_every_s=number(0.0, above=True, optional=True), keep_checkpoints=integer(1),
                      validate=boolean(), performance_steps=integer(1, optional=True)),
    **_under("dist", device=choice("auto", "npu", "cuda", "cpu"), timeout_s=number(0.0, above=True),
                     normalizer=choice("local", "global"), bucket_mb=number(0.0, above=True)),
    **_under("eval", max_vis_images=integer(0), use_faster_coco_eval=boolean(), error_analysis=boolean(optional=True)),
}


def _get(node, path: str):
    """The value at a dotted path of nested mappings; KeyError when a part is absent."""
    for part in path.split("."):
        if not (isinstance(node, dict) or (hasattr(node, "keys") and part in node.keys())):
            raise KeyError(path)
        node = node[part]
    return node


def _shown(value) -> str:
    text_ = repr(tuple(value) if isinstance(value, list) else value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."


def _problems(get: Callable[[str], Any], paths, where: Callable[[str], str]) -> list[str]:
    """'where(path)=value: what is wrong' for each field at `paths` breaking its own rule, then the cross rules'."""
    own = {}
    for path in paths:
        try:
            value = get(path)
        except KeyError:
            continue
        problem = _RULES[path](value)
        if problem:
            own[path] = f"{where(path)}={_shown(value)}: {problem}"
    return list(own.values()) + _cross_problems(get, where, own)


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
    widths = tuple(norm[2] * m for m in (1, 2, 4, 8)) if norm else ()
    if norm and norm[0] == "gn" and any(w % norm[1] for w in widths):
        bad("model.backbone.gn_groups", f"must divide every stage width {widths} (model.backbone.base_width={norm[2]} "
                                         f"times 1, 2, 4, 8)")
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


def check_config(cfg) -> None:
    """Checks every field of `cfg` (a ConfigDict or nested mappings; absent fields are skipped) and the cross rules.

    Raises ConfigError: one line naming each field at fault as `--config.<path>=<value>: <what is wrong>`.
    """
    problems = _problems(lambda path: _get(cfg, path), _RULES, "--config.{}".format)
    if problems:
        raise errors.ConfigError("; ".join(problems))


def precision_name(train_cfg) -> str:
    """'fp32' | 'fp16' | 'bf16': train.opt_level when set (O0 -> fp32, O1/O2 -> fp16), else train.precision; ''
    counts as unset (a command line cannot set None, so `--config.train.opt_level=` clears it)."""
    return train_cfg.precision if train_cfg.opt_level in (None, "") else OPT_LEVELS[train_cfg.opt_level]


def step_settings(cfg) -> StepSettings:
    """The train step's settings of a config; raises ConfigError as `check_config`."""
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
    """The DetectorSpec of a checked config whose model.num_classes is an int (programs resolve 'auto' first).

    category_ids, names: the label map (K each); None: `coco_names.label_map_for(K)`.
    Raises ConfigError: as `check_config`, model.num_classes still 'auto', or a label map of another length.
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
    problems = _problems(values.__getitem__, [p for p in _RULES if p in values], str)
    if spec.num_classes == "auto":
        problems.append("model.num_classes='auto': a spec holds the resolved class count")
    if len(spec.category_ids) != spec.num_classes or len(spec.names) != spec.num_classes:
        problems.append(f"the label map has {len(spec.category_ids)} ids and {len(spec.names)} names for "
                        f"{spec.num_classes} classes")
    return problems


def spec_from_json(obj, source: str) -> spec_lib.DetectorSpec:
    """A stored spec (`DetectorSpec.to_json`'s data, from the file `source`), read and checked.

    Raises InputFormatError: another format or version, fields missing or unknown, or values no config could hold.
    """
    try:
        spec = spec_lib.from_json(obj)
    except (spec_lib.SpecFormatError, TypeError) as e:
        raise errors.InputFormatError(f"{source}: the stored detector spec is unreadable: {e}") from None
    problems = spec_problems(spec)
    if problems:
        raise errors.InputFormatError(f"{source}: the stored detector spec is invalid: {'; '.join(problems)}")
    return spec
