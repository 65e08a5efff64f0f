"""The detector's spec: every setting that decides what a trained RetinaNet computes, typed, frozen and stored
beside the weights (to_json / from_json). The core trusts it; retina_fn.schema checks every field. Field names are
the config's (`spec.input.scale` is `data.scale`: CONFIG_PATHS); no defaults here, the configs hold them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from retina_fn import errors

FORMAT = "retina_fn.detector_spec"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """ResNet (retina_fn.model.resnet)."""

    depth: int  # 18 | 34 | 50 | 101 | 152
    style: str  # 'pytorch' (stride on the 3x3 conv) | 'caffe' (on the first 1x1)
    norm: str  # 'frozen_bn' | 'gn'
    bn_eps: float
    gn_groups: int
    base_width: int  # stem and stage-1 channels
    frozen_stages: int  # stem + layer1..N not trained (-1: nothing frozen)
    norm_affine_trainable: bool
    channels_last: bool  # memory format of the convolutions (the same function, another speed)


@dataclasses.dataclass(frozen=True)
class FPNSpec:
    out_channels: int
    extra_source: str  # 'input': P6 from C5 (mmdetection) | 'output': from P5 (torchvision v1)
    relu_before_extra: bool


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    feat_channels: int
    stacked_convs: int
    norm: str  # 'none' | 'gn'
    gn_groups: int
    prior_prob: float


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    style: str  # 'mmdet' | 'torchvision'
    octave_base_scale: float
    scales_per_octave: int
    ratios: tuple[float, ...]  # h / w
    strides: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CoderSpec:
    means: tuple[float, float, float, float]
    stds: tuple[float, float, float, float]
    scale_clamp: float
    clamp_lower: bool


@dataclasses.dataclass(frozen=True)
class AssignerSpec:
    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool
    low_quality: str  # 'mmdet' | 'torchvision'
    ignore_iof_thr: float


@dataclasses.dataclass(frozen=True)
class LossSpec:
    focal_alpha: float
    focal_gamma: float
    fused_focal: bool
    cls_weight: float
    box_loss: str  # 'l1' | 'giou'
    box_weight: float
    normalizer: str  # 'batch' | 'image'


@dataclasses.dataclass(frozen=True)
class PostprocessSpec:
    """Test-time post-processing (retina_fn.postprocess), the config's model.test."""

    nms_pre: int
    pre_select: str  # 'anchor' | 'pair'
    score_thr: float
    nms_iou: float
    max_per_img: int
    max_candidates: int
    static_shapes: bool


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How an image becomes the network's input (retina_fn.data.resize, transforms)."""

    resize_mode: str  # 'mmdet' | 'torchvision'
    scale: tuple[int, int]  # keep-ratio resize limits (long side, short side)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    landscape_canvas: tuple[int, int]  # (H, W)
    portrait_canvas: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """Everything that decides what the detector computes; the parts are their config blocks."""

    num_classes: int  # K
    category_ids: tuple[int, ...]  # the category id and name of each class index
    names: tuple[str, ...]
    backbone: BackboneSpec
    fpn: FPNSpec
    head: HeadSpec
    anchors: AnchorSpec
    coder: CoderSpec
    assigner: AssignerSpec
    loss: LossSpec
    test: PostprocessSpec
    size_divisor: int  # images are padded to a multiple of it
    canvas_exact: bool  # each image's outputs equal those of the image padded alone (retina_fn.extent)
    input: InputSpec

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples as lists), with the format and version."""
        return {"format": FORMAT, "version": VERSION, **_plain(dataclasses.asdict(self))}

    def replace(self, **changes) -> "DetectorSpec":
        """dataclasses.replace."""
        return dataclasses.replace(self, **changes)


_FIELDS = tuple(f.name for f in dataclasses.fields(DetectorSpec))
PARTS = {"backbone": BackboneSpec, "fpn": FPNSpec, "head": HeadSpec, "anchors": AnchorSpec, "coder": CoderSpec,
         "assigner": AssignerSpec, "loss": LossSpec, "test": PostprocessSpec, "input": InputSpec}

# Where each field of the spec is set in a config: parts under 'model', except the input's under 'data'.
CONFIG_PATHS = {"input": "data", "num_classes": "model.num_classes", "size_divisor": "model.size_divisor",
                "canvas_exact": "model.canvas_exact"}


def config_path(field: str) -> str:
    """The config path of a spec field: 'anchors.octave_base_scale' -> 'model.anchors.octave_base_scale',
    'input.scale' -> 'data.scale'."""
    head, _, rest = field.partition(".")
    if head in CONFIG_PATHS:
        return CONFIG_PATHS[head] + (f".{rest}" if rest else "")
    return f"model.{field}"


class SpecFormatError(ValueError):
    """A stored spec that is not one: another format or version, a missing or unknown field."""


def from_json(obj: Any) -> DetectorSpec:
    """A DetectorSpec from `to_json`'s data, values unchecked (retina_fn.schema.spec_from_json checks them).

    Raises:
      SpecFormatError: not a dict of this format and version, or fields missing or unknown (named).
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise SpecFormatError(f"not a {FORMAT} object")
    if obj.get("version") != VERSION:
        raise SpecFormatError(f"{FORMAT} version {obj.get('version')!r}; this retina_fn reads version {VERSION}")
    return _build(DetectorSpec, {k: v for k, v in obj.items() if k not in ("format", "version")}, "")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise SpecFormatError(f"{where or 'the spec'} must be an object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing, unknown = [n for n in names if n not in data], [k for k in data if k not in names]
    problems = [f"{kind} {', '.join(which)}" for kind, which in (("missing", missing), ("unknown", unknown)) if which]
    if problems:
        raise SpecFormatError(f"{where or 'the spec'}: " + "; ".join(problems))
    parts = PARTS if cls is DetectorSpec else {}
    return cls(**{n: _build(parts[n], data[n], f"{where}{n}") if n in parts else _tuples(data[n]) for n in names})


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def flat(spec: DetectorSpec) -> dict[str, Any]:
    """{'anchors.octave_base_scale': 4.0, ...}: every field of the spec by its dotted name."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(spec, name)
        if dataclasses.is_dataclass(value):
            out.update({f"{name}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(value)})
        else:
            out[name] = value
    return out


def differences(a: DetectorSpec, b: DetectorSpec, fields=None) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for every field that differs, optionally among `fields` only."""
    fa, fb = flat(a), flat(b)
    return [(k, fa[k], fb[k]) for k in fa if (fields is None or k in fields) and fa[k] != fb[k]]


# Fields that change speed or training, not the detections: a config may differ from a stored spec in these.
NOT_COMPARED = frozenset({"backbone.channels_last", "backbone.frozen_stages", "backbone.norm_affine_trainable",
                          "test.static_shapes"} | {f"assigner.{f.name}" for f in dataclasses.fields(AssignerSpec)}
                         | {f"loss.{f.name}" for f in dataclasses.fields(LossSpec)})


_LABEL_MAP = ("category_ids", "names")  # the weights' own (the training data's), never a config's


def reconcile(stored: DetectorSpec, configured: DetectorSpec, source: str,
              take_from_config: tuple[str, ...] = ()) -> tuple[DetectorSpec, list[str]]:
    """(spec to run, one log line per field taken from the config): the weights' `stored` spec with the fields
    `take_from_config` names (config paths such as 'model.test.score_thr', or 'all') from `configured`.

    Raises:
      ConfigError: fields that differ, other than NOT_COMPARED and those taken, each named with both values; or a
      take_from_config entry that names no spec field.
    """
    by_path = {config_path(k): k for k in flat(stored) if k not in _LABEL_MAP}
    wanted = set(by_path) if "all" in take_from_config else set(take_from_config)
    unknown = sorted(wanted - set(by_path))
    if unknown:
        raise errors.ConfigError(f"--use_config_for names no detector field: {', '.join(unknown)} (fields such as "
                                 f"model.test.score_thr, data.scale)")
    differing = [d for d in differences(stored, configured) if d[0] not in _LABEL_MAP]
    refused = [f"--config.{config_path(k)}={_shown(b)} (the weights' {_shown(a)})" for k, a, b in differing
               if k not in NOT_COMPARED and config_path(k) not in wanted]
    if refused:
        raise errors.ConfigError(
            f"{source} was trained with other settings than the config gives: {'; '.join(refused)}. Leave out "
            f"--config to use the weights' own, or pass --use_config_for=<field>,... (or =all) to use the config's")
    taken = {k: b for k, a, b in differing if config_path(k) in wanted}
    notes = [f"{config_path(k)}: {_shown(v)} from the config instead of the weights' "
             f"{_shown(flat(stored)[k])} (--use_config_for)" for k, v in taken.items()]
    return _with_fields(stored, taken), notes


def _with_fields(spec: DetectorSpec, values: dict[str, Any]) -> DetectorSpec:
    parts: dict[str, dict] = {}
    top = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            parts.setdefault(head, {})[rest] = value
        else:
            top[key] = value
    changes = {head: dataclasses.replace(getattr(spec, head), **fields) for head, fields in parts.items()}
    return dataclasses.replace(spec, **changes, **top)


def _shown(value) -> str:
    text = repr(tuple(value) if isinstance(value, list) else value)
    return text if len(text) <= 60 else text[:57] + "..."
