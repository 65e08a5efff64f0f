"""Checkpoints of a train state: atomic, verified, weights-only, the last K kept.

A checkpoint is one file `ckpt_<step>.pt` holding {'format', 'step', 'state': {path: tensor}, 'meta', 'digest'}
where 'digest' is `state_digest` of the state (files written before it existed load without one) and 'meta' is
plain JSON-able data (the resolved config, the label map, the data position). It is
written to a temporary file in the same directory, flushed and fsync'ed, then renamed over the final
name, so a crash leaves either the old set of checkpoints or the new one, never a half-written file
under a checkpoint name. A sidecar `ckpt_<step>.sha256` holds the file's digest; reading verifies it
and falls back to the previous checkpoint (with a warning naming the bad file) when a file is
truncated, corrupt or unreadable. Files are read with `torch.load(weights_only=True)`: a file whose
pickle names anything but tensors and plain data is refused before any of it runs; every field is checked
(`_checked`) and a non-finite floating tensor is refused, naming it.

A write that fails (a full disk, a read-only file system) raises OSError naming the file; the new
step leaves nothing behind and the older checkpoints are untouched.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import pickle
import re
import zipfile
from typing import Any, NamedTuple

import torch

from retina_fn import errors, tree

FORMAT = "retina_fn.checkpoint/1"
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")
log = logging.getLogger(__name__)


class CorruptCheckpoint(errors.UserError, RuntimeError):
    """A checkpoint file exists but cannot be trusted (truncated, digest mismatch, a field of the wrong type)."""


class Restored(NamedTuple):
    """A checkpoint read back by `load`.

    Attributes:
      path: the file it came from.
      step: the step it was saved at.
      state: nested dicts of CPU tensors (NamedTuples come back as dicts; see `restore_into`).
      meta: the JSON-able metadata saved with it.
    """

    path: str
    step: int
    state: dict  # nested dicts of tensors
    meta: dict


def path_for(directory: str, step: int) -> str:
    """The checkpoint file name for `step`.

    Args:
      directory: the checkpoint directory.
      step: a non-negative step, zero-padded to 9 digits.

    Returns:
      '<directory>/ckpt_<step:09d>.pt'.
    """
    return os.path.join(directory, f"ckpt_{step:09d}.pt")


def _atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory, fsync'ed, then renamed.

    Raises:
      OSError: (with the failing call's errno, e.g. ENOSPC or EROFS) naming `path`; the temporary file is
        removed and `path` keeps its previous content, if any.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        message = f"cannot write {path}: {e.strerror or e}"
        raise (OSError(e.errno, message) if e.errno else OSError(message)) from e
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_quietly(path: str) -> None:
    """Removes `path` if it exists; a failure (a read-only directory) is only logged."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def save(directory: str, step: int, state: dict, meta: dict[str, Any] | None = None, keep: int = 3) -> str:
    """Writes checkpoint `step` atomically with its digest, then deletes all but the newest `keep`.

    Args:
      directory: the checkpoint directory (created when missing).
      step: the train step, the file's number.
      state: a tree of tensors (nested dicts, NamedTuples); stored flat by path, tensors copied to the CPU.
      meta: JSON-able data (the resolved config, the label map, the data position); None: {}.
      keep: how many of the newest checkpoints to keep.

    Returns:
      The path written.

    Raises:
      OSError: naming the file, when the directory cannot be created or a write fails (a full disk, a
        read-only file system). Nothing of the new step is left behind (no temporary file, no checkpoint
        without its digest) and no older checkpoint has been deleted, so `restore_latest` still finds the
        previous one.
    """
    os.makedirs(directory, exist_ok=True)
    flat = {p: x.detach().to("cpu").clone() if isinstance(x, torch.Tensor) else x
            for p, x in tree.flatten_by_path(state).items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "step": int(step), "state": flat, "meta": meta or {},
                "digest": state_digest(flat)}, buffer)
    data = buffer.getvalue()
    path = path_for(directory, step)
    _atomic_write(path, data)
    try:
        _atomic_write(path[:-3] + ".sha256", hashlib.sha256(data).hexdigest().encode())
    except OSError:
        _remove_quietly(path)  # all or nothing: no checkpoint without its digest
        raise
    for old in list_checkpoints(directory)[keep:]:
        for f in (old, old[:-3] + ".sha256"):
            if os.path.exists(f):
                os.remove(f)
    _remove_stale_temporaries(directory)
    return path


def _remove_stale_temporaries(directory: str) -> None:
    """Deletes temporary files that a killed writer left ('ckpt_*.tmp.<pid>' of another process): one process
    writes a run's checkpoints, so after a successful save no other temporary file is in use."""
    mine = f".tmp.{os.getpid()}"
    for name in os.listdir(directory):
        if name.startswith("ckpt_") and ".tmp." in name and not name.endswith(mine):
            _remove_quietly(os.path.join(directory, name))


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint paths in `directory`, newest (highest step) first.

    Args:
      directory: the checkpoint directory (may be missing).

    Returns:
      list[str] of 'ckpt_<9 digits>.pt' paths; [] when the directory does not exist.
    """
    if not os.path.isdir(directory):
        return []
    names = sorted((n for n in os.listdir(directory) if _NAME.match(n)), reverse=True)
    return [os.path.join(directory, n) for n in names]


def load(path: str) -> Restored:
    """Reads and verifies one checkpoint file (its digest when the sidecar exists, then its content).

    Args:
      path: a checkpoint file.

    Returns:
      Restored(path, step, state as nested dicts of CPU tensors, meta).

    Raises:
      CorruptCheckpoint: naming the file, on any problem (unreadable, digest mismatch, not a checkpoint, a
        field missing or of the wrong type, a non-finite tensor).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read: {e}") from e
    digest_file = path[:-3] + ".sha256"
    if os.path.exists(digest_file):
        with open(digest_file, "rb") as f:
            raw = f.read()
        try:
            expected = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CorruptCheckpoint(f"{digest_file}: not a sha256 digest file (it holds non-text bytes); delete "
                                    f"it to load {path} on its stored digest alone") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptCheckpoint(f"{path}: content does not match its digest (truncated or corrupt file)")
    return verified(path, read_torch(data, path, CorruptCheckpoint))


def verified(path: str, obj: Any) -> Restored:
    """A checkpoint object read from `path` (`read_torch`), every field checked (see `load`)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = f"format {obj.get('format')!r:.60}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CorruptCheckpoint(f"{path}: not a {FORMAT} file (it holds {what})")
    _checked(obj, path)
    try:
        state = tree.unflatten_by_path(obj["state"])
    except ValueError as e:
        raise CorruptCheckpoint(f"{path}: field 'state': {e}") from None
    return Restored(path, obj["step"], state, obj["meta"])


_FIELDS = {"format": str, "step": int, "state": dict, "meta": dict}
_META_FIELDS = {"spec": dict, "config": dict, "data_position": dict, "world_size": int, "global_batch": int,
                "accum_steps": int, "segments": list, "label_map": dict}
_PLAIN = (str, int, float, bool, type(None))


def _checked(obj: dict, path: str) -> None:
    """Raises CorruptCheckpoint naming `path` and the field when `obj` is no well-formed checkpoint."""
    def fail(field, what):
        raise CorruptCheckpoint(f"{path}: field {field!r} {what}")

    for field in obj:
        if field not in _FIELDS and field != "digest":
            fail(field, f"is not a checkpoint field (expected {', '.join(_FIELDS)}, digest)")
    for field, kind in _FIELDS.items():
        if field not in obj:
            fail(field, "is missing")
        if not isinstance(obj[field], kind) or isinstance(obj[field], bool):
            fail(field, f"must be {kind.__name__}, got {type(obj[field]).__name__}")
    if obj["step"] < 0:
        fail("step", f"must be >= 0, got {obj['step']}")
    for key, leaf in obj["state"].items():
        if not isinstance(key, str) or not key:
            fail("state", f"has a key {key!r} that is no tensor path")
        if isinstance(leaf, torch.Tensor):
            if leaf.layout != torch.strided:
                fail(f"state/{key}", f"is a {leaf.layout} tensor, not a dense one")
            nonfinite_refusal(leaf, f"state {key!r}", path, CorruptCheckpoint)
        elif not isinstance(leaf, _PLAIN) or (isinstance(leaf, float) and not math.isfinite(leaf)):
            fail(f"state/{key}", f"must be a tensor or a finite number, got {leaf!r:.60}")
    for key, value in obj["meta"].items():
        if not isinstance(key, str):
            fail("meta", f"has a key {key!r} that is not a string")
        kind = _META_FIELDS.get(key)
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            fail(f"meta/{key}", f"must be {kind.__name__}, got {type(value).__name__}")
        bad = _not_plain(value)
        if bad is not None:
            fail(f"meta/{key}", f"holds {bad}, not JSON-able data")
    if "digest" in obj:
        if not isinstance(obj["digest"], str):
            fail("digest", f"must be str, got {type(obj['digest']).__name__}")
        if obj["digest"] != state_digest(obj["state"]):
            raise CorruptCheckpoint(f"{path}: content does not match the digest stored in it (corrupt file)")


def _not_plain(value: Any) -> str | None:
    """What in `value` is not JSON-able data (dicts with str keys, lists, tuples, str, numbers, None), or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = f"a key {k!r}" if not isinstance(k, str) else _not_plain(v)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for v in value:
            found = _not_plain(v)
            if found:
                return found
    elif not isinstance(value, _PLAIN):
        return f"a {type(value).__name__}"
    return None


def state_digest(flat: dict) -> str:
    """sha256 over a flat state's sorted paths, each leaf's dtype, shape and bytes (a non-tensor's repr)."""
    h = hashlib.sha256()
    for key in sorted(flat):
        x = flat[key]
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(f"{key}|{x!r}|".encode())
    return h.hexdigest()


def nonfinite_refusal(t: torch.Tensor, name: str, path: str, error: type[Exception]) -> None:
    """Raises `error` naming `path` and the tensor `name` when floating tensor `t` holds NaN or Inf."""
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise error(f"{path}: {name} holds non-finite values ({bad} of {t.numel()} NaN or Inf): the weights "
                    f"are unusable")


def file_kind(data: bytes) -> str | None:
    """What a file that is no PyTorch file holds, as the reason it is refused; None for one to unpickle (a torch
    zip with data.pkl, or a bare pickle)."""
    if not data:
        return "empty file"
    if data.startswith(b"\x93NUMPY"):
        return "a NumPy array file (.npy), not a PyTorch checkpoint"
    if data.startswith(b"\x80"):
        return None
    if data.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, ValueError, OSError):
            return "a truncated or corrupt zip archive"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return None
        if any(n.endswith("/archive_format") for n in names):
            return "an exported program (torch.export .pt2), not weights: pass its folder with --exported DIR"
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy archive (.npz), not a PyTorch checkpoint"
        return "not a PyTorch checkpoint (a zip archive without data.pkl)"
    head = data[:4096]
    if len(data) > 8 and head[8:10] == b'{"':
        return "a safetensors file, not a PyTorch checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        text = head[:e.start].decode("utf-8") if e.start > len(head) - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text, not a PyTorch checkpoint"
    return "not a PyTorch checkpoint (unrecognised binary content)"


def read_torch(data: bytes, path: str, error: type[Exception]) -> Any:
    """The object a PyTorch file's bytes hold, unpickled weights-only onto the CPU.

    Raises:
      error: naming `path` and what the file is when it is no PyTorch file (`file_kind`), is truncated or
        corrupt, or holds more than tensors and plain data (`unpickling_refusal`).
    """
    kind = file_kind(data)
    if kind:
        raise error(f"{path}: {kind}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types; name the file in one error
        refusal = unpickling_refusal(e)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise error(f"{path}: {refusal or f'a truncated or corrupt PyTorch file ({first})'}") from e


def unpickling_refusal(error: Exception) -> str | None:
    """Why weights-only unpickling refused a file, in one sentence; None when `error` is something else.

    torch.load(weights_only=True) unpickles tensors and plain data only; a pickle that names any other
    Python object (a class, a function such as os.system) could run code when loaded and is refused
    before anything of it runs.

    Args:
      error: what torch.load raised.

    Returns:
      The sentence, naming the object or pickle instruction that was refused, or None.
    """
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if not found:
        found = re.search(r"Unsupported operand (\d+)", text)
        return (f"refused by weights-only loading: it uses pickle instruction {found[1]}, which only a pickle "
                f"not written by torch.save (or a corrupt one) holds; nothing of it was run" if found
                else "not a readable PyTorch file")
    return (f"refused by weights-only loading: it names the Python object {found[1]}, which could run code when "
            f"unpickled; nothing of it was run. Load it with torch.load(weights_only=False) only if you trust "
            f"its source, and save its tensors alone (torch.save(state_dict))")


def restore_latest(directory: str) -> Restored | None:
    """The newest checkpoint of `directory` that reads and verifies.

    A bad one is reported (a warning naming the file) and the previous one used.

    Args:
      directory: the checkpoint directory.

    Returns:
      Restored, or None when there is no usable checkpoint.
    """
    for path in list_checkpoints(directory):
        try:
            return load(path)
        except CorruptCheckpoint as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def restore_into(restored: dict, like: Any, source: str) -> Any:
    """`restored` rebuilt with the structure of the template `like` (NamedTuples included).

    Args:
      restored: nested dicts, as `load` gives.
      like: the template tree whose paths and tensor shapes the checkpoint must match.
      source: what to call the checkpoint in the error message.

    Returns:
      A tree shaped like `like` holding the restored leaves.

    Raises:
      ValueError: listing (up to 40 of) the missing or unexpected paths and differing shapes.
    """
    a, b = tree.flatten_by_path(restored), tree.flatten_by_path(like)
    problems = [f"missing {p}" for p in b if p not in a] + [f"unexpected {p}" for p in a if p not in b]
    problems += [f"{p}: {tuple(a[p].shape)} vs expected {tuple(b[p].shape)}"
                 for p in a if p in b and isinstance(a[p], torch.Tensor) and a[p].shape != b[p].shape]
    if problems:
        raise ValueError(f"{source} does not fit this configuration:\n  " + "\n  ".join(problems[:40]))
    return tree.unflatten_like(like, a)
