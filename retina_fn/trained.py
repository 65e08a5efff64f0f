"""A trained detector read back from a file: its weights and the spec they were trained with.

    trained = load_trained("runs/demo/checkpoints/ckpt_000002655.pt")              # the checkpoint's own spec
    trained = load_trained(path, cfg, use_config_for=("model.test.score_thr",))    # a config given as well
    trained.params, trained.spec, trained.format

Where the spec comes from (one log line says which):
- a retina_fn checkpoint stores it (its metadata's 'spec'): that one. A config given as well must agree with it
  on every field that changes the detections (retina_fn.spec.reconcile), except the fields the user names in
  use_config_for ('all': every field), which the config gives and the log names.
- a retina_fn checkpoint written before checkpoints stored specs: the config's (one is needed).
- torchvision or mmdetection weights: the config's when one is given, else the reference spec of the layout they
  come from (retina_fn.interop.weights.reference_spec: mmdetection's 1x, torchvision's v1).
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
    """params: the full parameter tree (float32, CPU); spec: the DetectorSpec to run them with; meta: a
    retina_fn checkpoint's metadata ({} for other files); format: the file's layout (interop.weights.FORMATS)."""

    params: dict
    spec: spec_lib.DetectorSpec
    meta: dict
    format: str


def _configured_spec(cfg, raw: weights_lib.RawWeights, source: str) -> spec_lib.DetectorSpec:
    """The spec a config gives for these weights: model.num_classes 'auto' resolved from them, the label map the
    weights store (else COCO's or 1..K)."""
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

    Raises:
      ConfigError: a config that differs from the stored spec (each field named; see spec.reconcile), or
        use_config_for without a config. InputFormatError: a stored spec no config could hold.
        MissingFileError: an old retina_fn checkpoint without a config.
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
      cfg: a config (ConfigDict) to take the spec from where the file stores none, and to check the stored one
        against; None: the file's own.
      use_config_for: config paths ('model.test.score_thr', 'data.scale', or 'all') whose values the config
        gives instead of the stored spec.

    Returns:
      Trained(params float32 on the CPU, spec, meta, format).

    Raises:
      MissingFileError, CheckpointMismatch: the file; ConfigError, InputFormatError: see `spec_for`.
    """
    source = os.fspath(path)
    raw = weights_lib.read_weights(source)
    spec = spec_for(raw, source, cfg, use_config_for)
    params = weights_lib.from_state_dict(raw.state_dict, spec, source=source)
    return Trained(tree.cast(params, torch.float32, "cpu"), spec, raw.meta, raw.format)
