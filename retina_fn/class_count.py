"""model.num_classes: a positive int, or 'auto' for the class count of the data or the weights at hand.

'auto' (the default of `configs.common.base_config`) is resolved by the programs, once, before the model is
built, so the library's model code only ever sees an int:

- training (`from_training_set`): the training annotation file's category count; the label map
  (class index -> category id, name) is logged and stored with every checkpoint. The validation file must
  list the same categories (`check_same_categories`).
- evaluation, prediction and export: the weights' class count (a checkpoint's stored spec or label map, else the
  classification conv's output channels / anchors per cell: retina_fn.trained, `interop.weights.classes_in`);
  evaluation then refuses a detector whose classes are not the validation file's (`check_spec_categories`).
- programs that read neither data nor weights (benchmarks): `require_int` asks for an int.

An explicit int is checked against the same source and never changed.
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
    """Whether model.num_classes is 'auto' (still to be resolved)."""
    return isinstance(model_cfg.num_classes, str) and model_cfg.num_classes == AUTO


def explicit(model_cfg) -> int:
    """model.num_classes as an int, when it is one.

    Args:
      model_cfg: the `model` config block.

    Returns:
      The class count.

    Raises:
      ConfigError (a ValueError): model.num_classes is not a positive int (and not 'auto', which this function does not take).
    """
    value = model_cfg.num_classes
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.ConfigError(f"model.num_classes must be a positive integer or {AUTO!r}, got {value!r}")
    return value


def _settle(cfg, count: int, source: str) -> None:
    """Sets an 'auto' model.num_classes to `count`, or checks that the explicit int equals it.

    Raises:
      ConfigError (a ValueError): naming `source` and the flag that fits it, when an explicit int differs.
    """
    if is_auto(cfg.model):
        cfg.model.num_classes = count
        log.info("model.num_classes='auto': %d classes, from %s", count, source)
        return
    if explicit(cfg.model) != count:
        raise errors.ConfigError(f"model.num_classes is {cfg.model.num_classes} but {source} has {count} classes; set "
                                 f"--config.model.num_classes={count} (or {AUTO!r})")


def format_label_map(label_map: LabelMap) -> str:
    """'0: 1 circle, 1: 2 square, ...' (class index: category id, name)."""
    return ", ".join(f"{i}: {cid} {name}" for i, (cid, name) in enumerate(zip(label_map.category_ids,
                                                                                label_map.names)))


def category_differences(a: LabelMap, b: LabelMap) -> str:
    """What differs between two category tables, '' when they are equal.

    Args:
      a, b: the two label maps (the first and the second file).

    Returns:
      e.g. "ids only in the first: [3 'dog']; ids only in the second: [4 'bird']; same id, other name:
      [1 'cat' vs 'kitten']".
    """
    names_a = dict(zip(a.category_ids, a.names))
    names_b = dict(zip(b.category_ids, b.names))
    parts = []
    only_a = [f"{i} {names_a[i]!r}" for i in a.category_ids if i not in names_b]
    only_b = [f"{i} {names_b[i]!r}" for i in b.category_ids if i not in names_a]
    renamed = [f"{i} {names_a[i]!r} vs {names_b[i]!r}" for i in a.category_ids
               if i in names_b and names_a[i] != names_b[i]]
    if only_a:
        parts.append(f"ids only in the first: [{', '.join(only_a)}]")
    if only_b:
        parts.append(f"ids only in the second: [{', '.join(only_b)}]")
    if renamed:
        parts.append(f"same id, other name: [{', '.join(renamed)}]")
    return "; ".join(parts)


def check_same_categories(train_set: CocoSet, val_set: CocoSet) -> None:
    """Refuses a validation file whose categories differ from the training file's: class indices follow
    the sorted category ids, so evaluation would score every class against another one.

    Raises:
      ConfigError (a ValueError): naming both annotation files and the differing ids and names.
    """
    differences = category_differences(train_set.label_map, val_set.label_map)
    if differences:
        raise errors.ConfigError(f"the training and validation annotation files list different categories "
                                 f"(first: {train_set.ann_file}, second: {val_set.ann_file}): {differences}. Both "
                                 f"must list the same category ids and names.")


def from_training_set(cfg, train_set: CocoSet) -> None:
    """Resolves model.num_classes from the training annotation file (see the module docstring) and logs the
    label map.

    Args:
      cfg: the whole config; an 'auto' model.num_classes is replaced by the category count (in place).
      train_set: the parsed training annotation file.

    Raises:
      ConfigError (a ValueError): an explicit model.num_classes other than the file's category count, or not a positive int.
    """
    _settle(cfg, train_set.label_map.num_classes, train_set.ann_file)
    log.info("label map of %s (class index: category id, name): %s", train_set.ann_file,
             format_label_map(train_set.label_map))


def check_spec_categories(spec, meta: dict, val_set: CocoSet, weights: str) -> None:
    """Refuses a detector whose classes are not the validation file's: its class count must be the file's, and a
    retina_fn checkpoint's stored label map must list the same categories (its detections would be scored
    against the wrong classes). torchvision and mmdetection weights store no label map: their classes are COCO's.

    Raises:
      CheckpointMismatch: naming the weights file, the validation file and the counts or the differing ids and
      names.
    """
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
    """model.num_classes for a program that reads neither an annotation file nor weights.

    Args:
      cfg: the whole config.
      program: the program's name, for the message.

    Returns:
      The explicit class count.

    Raises:
      ConfigError (a ValueError): model.num_classes is 'auto' (nothing to take the count from) or not a positive int.
    """
    if is_auto(cfg.model):
        raise errors.ConfigError(f"model.num_classes is {AUTO!r}, which takes the class count from the training "
                                 f"annotation file or the weights; {program} reads neither: set "
                                 f"--config.model.num_classes=N")
    return explicit(cfg.model)
