"""Loading foreign state_dicts into parameter trees by an explicit key mapping, with one report.

A mapping is {our '/'-joined path: their dotted key}. `load_mapped` checks every entry and raises one
`CheckpointMismatch` that lists all missing, unexpected and mis-shaped keys together, instead of stopping
at the first problem.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

from retina_fn import tree


class CheckpointMismatch(ValueError):
    """A foreign checkpoint does not fit the parameter tree of the configured model."""


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a local .pth/.pt file with weights-only unpickling and unwraps the usual containers
    ({'state_dict': ...} as mmdetection writes, {'model': ...}). Returns {key: tensor} on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; name the file in one message
        raise CheckpointMismatch(f"cannot read {path} as a weights-only torch checkpoint: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path} does not hold a state_dict of tensors")
    return dict(obj)


def load_mapped(state_dict: dict[str, torch.Tensor], like: dict, mapping: dict[str, str],
                ignore: Iterable[str] = (), source: str = "checkpoint") -> dict:
    """Builds a tree shaped like `like` from `state_dict[mapping[path]]` (float32).

    ignore: their keys (or key suffixes such as 'num_batches_tracked') that may be present unused.
    Raises CheckpointMismatch listing every missing, mis-shaped and unexpected key at once."""
    ignore = tuple(ignore)
    ours = tree.flatten_by_path(like)
    if set(mapping) != set(ours):
        raise ValueError("internal error: the key mapping does not cover the parameter tree")
    out, missing, misshaped = {}, [], []
    for path, leaf in ours.items():
        key = mapping[path]
        if key not in state_dict:
            missing.append(f"{key} (for {path})")
            continue
        value = state_dict[key]
        if tuple(value.shape) != tuple(leaf.shape):
            misshaped.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(leaf.shape)}")
            continue
        out[path] = value.detach().to(torch.float32).clone()
    used = set(mapping.values())
    unexpected = [k for k in state_dict if k not in used and not any(k == i or k.endswith(i) for i in ignore)]
    if missing or misshaped or unexpected:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in sorted(items)[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointMismatch("\n".join(lines))
    return tree.unflatten_by_path(out)
