"""Foreign state_dicts into parameter trees by a key mapping {our '/'-joined path: their dotted key}.

Every problem (missing, unexpected, mis-shaped keys) goes into one `CheckpointMismatch` report.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from retina_fn import errors, tree
from retina_fn.checkpoint import unpickling_refusal

# Containers training scripts wrap a state_dict in: mmcv's ('state_dict'), torchvision's references ('model').
_WRAPPERS = ("state_dict", "model")
_DATA_PARALLEL_PREFIX = "module."


class CheckpointMismatch(errors.UserError, ValueError):
    """Weights or a checkpoint that do not fit the configured model (or are not a detector's weights)."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object in a local .pth/.pt file, unpickled weights-only onto the CPU (plain data and tensors only).

    Raises MissingFileError; CheckpointMismatch: not a torch file, or a pickle weights-only loading refuses.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; name the file in one message
        refusal = unpickling_refusal(e)
        if refusal:
            raise CheckpointMismatch(f"{path}: {refusal}") from e
        raise CheckpointMismatch(f"cannot read {path} as a weights-only torch checkpoint: {e}") from e


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """{key: tensor} of a loaded checkpoint: unwraps {'state_dict' | 'model': ...}, drops a DataParallel
    'module.' prefix that every key carries."""
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{source} does not hold a state_dict of tensors")
    if all(str(k).startswith(_DATA_PARALLEL_PREFIX) for k in obj):
        return {k[len(_DATA_PARALLEL_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{key: CPU tensor} of a local .pth/.pt file (`read_checkpoint`, then `unwrap_state_dict`)."""
    return unwrap_state_dict(read_checkpoint(path), os.fspath(path))


def load_mapped(state_dict: dict[str, torch.Tensor], like: dict, mapping: dict[str, str],
                ignore: Iterable[str] = (), source: str = "checkpoint", notes: Iterable[str] = ()) -> dict:
    """A tree shaped like `like` of float32 `state_dict[mapping[path]]`.

    ignore: their keys (or key suffixes such as 'num_batches_tracked') that may be present unused.
    notes: the caller's own problems (e.g. a class-count mismatch): they head the report and make it fail.
    Raises CheckpointMismatch: listing every missing, mis-shaped and unexpected key at once.
    """
    ignore, notes = tuple(ignore), list(notes)
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
    if missing or misshaped or unexpected or notes:
        lines = [f"{source} does not match the model:"]
        lines.extend(f"  {note}" for note in notes)
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in sorted(items)[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointMismatch("\n".join(lines))
    return tree.unflatten_by_path(out)
