"""Whole-detector weights in and out by key mapping; a format module supplies only `key_of(our path) -> their key`.

The class head gets a class-count mismatch report, or a fresh head on request.
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
    """The configured model's parameter tree on the 'meta' device (shapes only): what a checkpoint has to fill."""
    with torch.device("meta"):
        return retinanet.init(rng.key(0), spec)


def _is_class_head(path: str) -> bool:
    return path.startswith(CLASS_HEAD + tree.SEP)


def fresh_class_head(key: rng.Key, spec) -> dict[str, torch.Tensor]:
    """A new classification conv as `retina_fn.model.head.init` makes it (weight N(0, 0.01), prior-prob bias)."""
    channels = anchors.anchors_per_cell(spec.anchors) * int(spec.num_classes)
    p = nn.init.conv(key, channels, int(spec.head.feat_channels), 3, "normal", std=0.01)
    p["bias"] = nn.init.prior_prob_bias((channels,), float(spec.head.prior_prob))
    return p


def import_detector(state_dict: dict[str, torch.Tensor], spec, key_of: KeyOf, *, source: str,
                    ignore: Iterable[str] = (), reinit_class_head: bool = False,
                    key: rng.Key | None = None) -> dict:
    """The full parameter tree (float32, CPU) for spec from a foreign state_dict keyed by `key_of(path)`.

    reinit_class_head: take all but the classification conv from the checkpoint (any class count) and draw that
    conv from `key` (default rng.key(0)); otherwise a class-count difference is reported.
    Raises CheckpointMismatch: one report of every missing, mis-shaped and unexpected key.
    """
    like = template(spec)
    mapping = {p: key_of(p) for p in tree.paths(like)}
    class_keys = tuple(mapping[p] for p in mapping if _is_class_head(p))
    notes: list[str] = []
    set_aside = reinit_class_head
    if not reinit_class_head:
        weight_key = mapping[CLASS_HEAD + tree.SEP + "weight"]
        expected = tree.flatten_by_path(like)[CLASS_HEAD + tree.SEP + "weight"].shape[0]
        if weight_key in state_dict and state_dict[weight_key].shape[0] != expected:
            channels = int(state_dict[weight_key].shape[0])
            n, k = anchors.anchors_per_cell(spec.anchors), int(spec.num_classes)
            head = f"class head: {weight_key} has {channels} output channels"
            if channels % n:
                notes.append(f"{head}, not a multiple of the {n} anchors per cell of model.anchors; the config's "
                             f"model.num_classes={k} needs {n * k}")
            else:
                notes.append(f"{head} = {channels // n} classes x {n} anchors, but the config has model.num_classes="
                             f"{k} ({n * k} channels); set --config.model.num_classes={channels // n} to use the "
                             f"checkpoint's head as it is; to fine-tune a new {k}-class head, load the file in Python "
                             f"with retina_fn.interop.weights.load_detector_weights(path, spec, "
                             f"reinit_class_head=True)")
            set_aside = True  # reported once above, not again as mis-shaped keys
    if not set_aside:
        return load_mapped(state_dict, like, mapping, ignore=ignore, source=source)
    body = tree.filter(like, lambda p, _: not _is_class_head(p))
    body_mapping = {p: k for p, k in mapping.items() if not _is_class_head(p)}
    params = load_mapped(state_dict, body, body_mapping, ignore=tuple(ignore) + class_keys, source=source,
                         notes=notes)
    head = fresh_class_head(rng.key(0) if key is None else key, spec)
    return tree.merge(params, {"head": {"cls_logits": head}})


def export_detector(params: dict, spec, key_of: KeyOf) -> dict[str, torch.Tensor]:
    """{their key: float32 CPU copy} of every leaf of params; CheckpointMismatch when they do not fit spec."""
    ours = {p: tuple(x.shape) for p, x in tree.leaves_with_paths(template(spec))}
    theirs = {p: tuple(x.shape) for p, x in tree.leaves_with_paths(params)}
    problems = [f"missing {p}" for p in ours if p not in theirs]
    problems += [f"unexpected {p}" for p in theirs if p not in ours]
    problems += [f"{p}: {theirs[p]} vs model {ours[p]}" for p in ours if p in theirs and theirs[p] != ours[p]]
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointMismatch(f"parameters do not fit the configured model:\n  {shown}")
    return {key_of(p): x.detach().to("cpu", torch.float32).clone() for p, x in tree.leaves_with_paths(params)}
