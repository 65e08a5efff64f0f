"""Whole-detector weights in and out by key mapping: the configured model's parameter template, the
class head (class-count mismatch report, or a fresh head on request), import and export.

A format module (torchvision, mmdet) supplies only `key_of(path) -> their key` for every leaf path of
our tree; everything else is shared here.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from retina_fn import anchors, nn, rng, tree
from retina_fn.interop.mapping import CheckpointMismatch, load_mapped
from retina_fn.model import retinanet

CLASS_HEAD = "head/cls_logits"  # the last classification conv: the only class-dependent leaves

KeyOf = Callable[[str], str]


def template(spec) -> dict:
    """The configured model's parameter tree with shapes only (tensors on the 'meta' device, no memory,
    no random draws worth the name): what a checkpoint has to fill."""
    with torch.device("meta"):
        return retinanet.init(rng.key(0), spec)


def key_mapping(like: dict, key_of: KeyOf) -> dict[str, str]:
    """{our path: their key} for every leaf of `like`."""
    return {p: key_of(p) for p in tree.paths(like)}


def _is_class_head(path: str) -> bool:
    return path.startswith(CLASS_HEAD + tree.SEP)


def fresh_class_head(key: rng.Key, spec) -> dict[str, torch.Tensor]:
    """A new classification conv as `retina_fn.model.head.init` makes it: weight [n * K, C, 3, 3] from
    N(0, 0.01), bias -log((1 - prior) / prior) (n anchors per cell, K = model.num_classes, C =
    head.feat_channels)."""
    channels = anchors.anchors_per_cell(spec.anchors) * int(spec.num_classes)
    p = nn.init.conv(key, channels, int(spec.head.feat_channels), 3, "normal", std=0.01)
    p["bias"] = nn.init.prior_prob_bias((channels,), float(spec.head.prior_prob))
    return p


def class_count_note(key: str, channels: int, spec) -> str:
    """The report line for a classification conv with `channels` outputs that the config does not fit."""
    n = anchors.anchors_per_cell(spec.anchors)
    k = int(spec.num_classes)
    if channels % n:
        return (f"class head: {key} has {channels} output channels, not a multiple of the {n} anchors per "
                f"cell of model.anchors; the config's model.num_classes={k} needs {n * k}")
    return (f"class head: {key} has {channels} output channels = {channels // n} classes x {n} anchors, but "
            f"the config has model.num_classes={k} ({n * k} channels); set --config.model.num_classes="
            f"{channels // n} to use the checkpoint's head as it is, or load with reinit_class_head=True to "
            f"start a new {k}-class head (fine-tuning)")


def import_detector(state_dict: dict[str, torch.Tensor], spec, key_of: KeyOf, *, source: str,
                    ignore: Iterable[str] = (), reinit_class_head: bool = False,
                    key: rng.Key | None = None) -> dict:
    """A full parameter tree {'backbone', 'fpn', 'head'} (float32, CPU) for spec from a foreign
    state_dict whose key for our leaf `path` is `key_of(path)`.

    reinit_class_head: take everything but the classification conv from the checkpoint (whatever its
      class count) and initialise that conv afresh from `key` (default rng.key(0)), for fine-tuning on
      model.num_classes classes. Otherwise a class-count difference is reported with a hint.
    Raises CheckpointMismatch with one report of every missing, mis-shaped and unexpected key."""
    like = template(spec)
    mapping = key_mapping(like, key_of)
    class_keys = tuple(mapping[p] for p in mapping if _is_class_head(p))
    notes: list[str] = []
    set_aside = reinit_class_head
    if not reinit_class_head:
        weight_key = mapping[CLASS_HEAD + tree.SEP + "weight"]
        expected = tree.flatten_by_path(like)[CLASS_HEAD + tree.SEP + "weight"].shape[0]
        if weight_key in state_dict and state_dict[weight_key].shape[0] != expected:
            notes.append(class_count_note(weight_key, int(state_dict[weight_key].shape[0]), spec))
            set_aside = True  # reported once above, not again as mis-shaped keys
    if not set_aside:
        return load_mapped(state_dict, like, mapping, ignore=ignore, source=source)
    body = tree.filter(like, lambda p, _: not _is_class_head(p))
    body_mapping = {p: k for p, k in mapping.items() if not _is_class_head(p)}
    params = load_mapped(state_dict, body, body_mapping, ignore=tuple(ignore) + class_keys, source=source,
                         notes=notes)
    head = fresh_class_head(rng.key(0) if key is None else key, spec)
    return tree.merge(params, {"head": {"cls_logits": head}})


def check_params(params: dict, spec, what: str = "parameters") -> None:
    """Raises CheckpointMismatch listing every path missing, unexpected or of another shape in `params`
    compared with the tree spec builds."""
    ours = {p: tuple(x.shape) for p, x in tree.leaves_with_paths(template(spec))}
    theirs = {p: tuple(x.shape) for p, x in tree.leaves_with_paths(params)}
    problems = [f"missing {p}" for p in ours if p not in theirs]
    problems += [f"unexpected {p}" for p in theirs if p not in ours]
    problems += [f"{p}: {theirs[p]} vs model {ours[p]}" for p in ours if p in theirs and theirs[p] != ours[p]]
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointMismatch(f"{what} do not fit the configured model:\n  {shown}")


def export_detector(params: dict, spec, key_of: KeyOf) -> dict[str, torch.Tensor]:
    """{their key: tensor (float32, CPU, a copy)} for every leaf of params (checked against spec)."""
    check_params(params, spec)
    return {key_of(p): x.detach().to("cpu", torch.float32).clone() for p, x in tree.leaves_with_paths(params)}
