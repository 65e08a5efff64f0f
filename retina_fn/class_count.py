"""model.num_classes: a positive int, or 'auto' for the class count of the data or the weights at hand.

The programs resolve 'auto' once, before the model is built: training from the training annotation file
(`from_training_set`), evaluation, prediction and export from the weights (retina_fn.trained), and programs that
read neither ask for an int (`require_int`). An explicit int is checked against the same source, never changed.
"""

from __future__ import annotations

import logging

from retina_fn import errors
from retina_fn.data.coco import CocoSet, LabelMap
from retina_fn.interop.mapping import CheckpointMismatch
from retina_fn.interop.weights import stored_label_map

log = logging.getLogger(__name__)

AUTO = "auto"


def is_auto(model_cfg) -> bool:
    return isinstance(model_cfg.num_classes, str) and model_cfg.num_classes == AUTO


def explicit(model_cfg) -> int:
    """model.num_classes of the `model` block; ConfigError when it is not a positive int."""
    value = model_cfg.num_classes
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.ConfigError(f"model.num_classes must be a positive integer or {AUTO!r}, got {value!r}")
    return value


def category_differences(a: LabelMap, b: LabelMap) -> str:
    """What differs between two label maps, e.g. "ids only in the first: [3 'dog']; same id, other name: [1 'cat'
    vs 'kitten']"; '' when they are equal."""
    names_a, names_b = dict(zip(a.category_ids, a.names)), dict(zip(b.category_ids, b.names))
    parts = {"ids only in the first": [f"{i} {names_a[i]!r}" for i in a.category_ids if i not in names_b],
             "ids only in the second": [f"{i} {names_b[i]!r}" for i in b.category_ids if i not in names_a],
             "same id, other name": [f"{i} {names_a[i]!r} vs {names_b[i]!r}" for i in a.category_ids
                                     if i in names_b and names_a[i] != names_b[i]]}
    return "; ".join(f"{title}: [{', '.join(items)}]" for title, items in parts.items() if items)


def check_same_categories(train_set: CocoSet, val_set: CocoSet) -> None:
    """Raises ConfigError when the validation file's categories differ from the training file's (class indices
    follow the sorted ids, so evaluation would score each class against another)."""
    differences = category_differences(train_set.label_map, val_set.label_map)
    if differences:
        raise errors.ConfigError(f"the training and validation annotation files list different categories "
                                 f"(first: {train_set.ann_file}, second: {val_set.ann_file}): {differences}. Both "
                                 f"must list the same category ids and names.")


def from_training_set(cfg, train_set: CocoSet) -> None:
    """Resolves cfg.model.num_classes in place from the training file's category count and logs the label map.

    Raises ConfigError: an explicit model.num_classes other than the file's count, or not a positive int.
    """
    count, source, label_map = train_set.label_map.num_classes, train_set.ann_file, train_set.label_map
    if is_auto(cfg.model):
        cfg.model.num_classes = count
        log.info("model.num_classes='auto': %d classes, from %s", count, source)
    elif explicit(cfg.model) != count:
        raise errors.ConfigError(f"model.num_classes is {cfg.model.num_classes} but {source} has {count} classes; set "
                                 f"--config.model.num_classes={count} (or {AUTO!r})")
    pairs = enumerate(zip(label_map.category_ids, label_map.names))
    log.info("label map of %s (class index: category id, name): %s", source,
             ", ".join(f"{i}: {cid} {name}" for i, (cid, name) in pairs))


def check_spec_categories(spec, meta: dict, val_set: CocoSet, weights: str) -> None:
    """Raises CheckpointMismatch when the detector's class count or stored label map (retina_fn checkpoints only)
    is not the validation file's."""
    stored = stored_label_map(meta)
    if stored is not None:
        differences = category_differences(LabelMap(tuple(stored[0]), tuple(stored[1])), val_set.label_map)
        if differences:
            raise CheckpointMismatch(f"{weights} was trained on other categories than {val_set.ann_file} lists "
                                     f"(first: the checkpoint's label map, second: the validation file): "
                                     f"{differences}")
    if spec.num_classes != val_set.label_map.num_classes:
        raise CheckpointMismatch(f"{weights} gives {spec.num_classes} classes but {val_set.ann_file} has "
                                 f"{val_set.label_map.num_classes}; pass a config whose "
                                 f"--config.model.num_classes={val_set.label_map.num_classes} fits the weights")


def require_int(cfg, program: str) -> int:
    """model.num_classes for `program`, which reads neither annotations nor weights; ConfigError for 'auto'."""
    if is_auto(cfg.model):
        raise errors.ConfigError(f"model.num_classes is {AUTO!r}, which takes the class count from the training "
                                 f"annotation file or the weights; {program} reads neither: set "
                                 f"--config.model.num_classes=N")
    return explicit(cfg.model)
