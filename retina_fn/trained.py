"""A trained detector read back from a file: its weights and the spec they were trained with.

Where the spec comes from (a log line says which): a retina_fn checkpoint's stored spec, which a config given as
well must match on every field that changes detections (spec.reconcile) except those named in use_config_for
('all': every field); for an old checkpoint without one, the config's; for torchvision / mmdetection weights, the
config's, else their layout's reference spec (interop.weights.reference_spec).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import NamedTuple, Sequence

import torch

from retina_fn import anchors, class_count, errors, schema, tree
from retina_fn import spec as spec_lib
from retina_fn.interop import weights as weights_lib

log = logging.getLogger(__name__)


class Trained(NamedTuple):
    """params (float32, CPU), the spec to run them with, a retina_fn checkpoint's meta ({} else), the file's format."""

    params: dict
    spec: spec_lib.DetectorSpec
    meta: dict
    format: str


def _configured_spec(cfg, raw: weights_lib.RawWeights, source: str) -> spec_lib.DetectorSpec:
    """The config's spec for these weights: 'auto' classes resolved from them, their stored label map if any."""
    cfg = copy.deepcopy(cfg)
    if class_count.is_auto(cfg.model):
        count, where = weights_lib.classes_in(raw, anchors.anchors_per_cell(cfg.model.anchors), source)
        cfg.model.num_classes = count
        log.info("model.num_classes='auto': %d classes, from %s", count, where)
    stored = weights_lib.stored_label_map(raw.meta)
    if stored is not None and len(stored[0]) == int(cfg.model.num_classes):
        return schema.detector_spec(cfg, *stored)
    return schema.detector_spec(cfg)  # a class count the weights do not have is reported against them


def spec_for(raw: weights_lib.RawWeights, source: str, cfg=None, use_config_for: Sequence[str] = ()
             ) -> spec_lib.DetectorSpec:
    """The spec to run weights already read with (see the module docstring).

    Raises ConfigError: a config that differs from the stored spec, use_config_for without a config, or an old
    retina_fn checkpoint without a config. InputFormatError: a stored spec no config could hold.
    """
    stored = schema.spec_from_json(raw.meta["spec"], source) if raw.meta.get("spec") else None
    if cfg is None:
        if use_config_for:
            raise errors.ConfigError("--use_config_for takes fields from a config: pass --config as well")
        if stored is not None:
            log.info("detector spec: the one stored in %s", source)
            return stored
        if raw.format == "retina_fn":
            raise errors.ConfigError(f"{source} stores no detector spec (it was written before checkpoints stored "
                                     f"theirs): pass the config it was trained with (--config)")
        log.info("detector spec: the reference layout of %s weights (%s)", raw.format, source)
        return weights_lib.reference_spec(raw.state_dict, raw.format, source)
    configured = _configured_spec(cfg, raw, source)
    if stored is None:
        log.info("detector spec: from the config (%s stores none)", source)
        return configured
    chosen, notes = spec_lib.reconcile(stored, configured, source, tuple(use_config_for))
    for note in notes:
        log.warning("%s", note)
    return chosen


def load_trained(path: str | os.PathLike, cfg=None, use_config_for: Sequence[str] = ()) -> Trained:
    """Weights and spec of a trained detector (see the module docstring).

    Args:
      path: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
      cfg: a config to take the spec from where the file stores none and to check a stored one against.
      use_config_for: config paths ('model.test.score_thr', or 'all') the config gives instead of the stored spec.

    Raises MissingFileError, CheckpointMismatch (the file); ConfigError, InputFormatError (see `spec_for`).
    """
    source = os.fspath(path)
    raw = weights_lib.read_weights(source)
    spec = spec_for(raw, source, cfg, use_config_for)
    params = weights_lib.from_state_dict(raw.state_dict, spec, source=source)
    return Trained(tree.cast(params, torch.float32, "cpu"), spec, raw.meta, raw.format)
