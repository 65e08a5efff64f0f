"""The export folder and reading it back: file names, the tensors' names, model.json (what `make_spec` writes)
and the torch.export program as a callable (what `experiments.predict --exported` runs).

    spec = make_spec(detector_spec, name="demo", batch=1, ...)   # model.json's content
    spec = read_spec("exported/demo")                  # model.json, checked
    run = load_program("exported/demo", spec)          # run(batch) -> postprocess.Detections
    cfg = transform_config(spec)                       # the input pipeline onto the export's canvas
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from typing import Any, Callable

import torch

from retina_fn import checkpoint, errors, schema
from retina_fn.data import transforms
from retina_fn.postprocess import Detections
from retina_fn.spec import DetectorSpec

SPEC_FORMAT = "retina_fn-export"
SPEC_VERSION = 2
SPEC_FILE = "model.json"
PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
INPUT_NAMES = ("image", "image_hw", "scale_factor")
OUTPUT_NAMES = ("boxes", "scores", "labels", "valid")

_SIZE_RULES = {
    "mmdet": "s = min(long_max / max(h, w), short_max / min(h, w)); new_h = int(h * s + 0.5), "
             "new_w = int(w * s + 0.5) (rounded)",
    "torchvision": "s = min(short_max / min(h, w), long_max / max(h, w)); new_h = int(h * s), new_w = int(w * s) "
                   "(floored)",
}
_RESIZES = {
    "mmdet": "the uint8 RGB image is resized bilinearly to (new_h, new_w) with half-pixel centres "
             "(source = (dest + 0.5) * in / out - 0.5, clamped to the edges), no antialiasing, back to uint8 "
             "(separable, the horizontal pass first, each pass with fixed-point weights and rounded to uint8: "
             "experiments/onnx_predict.py does it bit for bit; OpenCV's INTER_LINEAR is within 1 level of it), "
             "then normalised per channel in float32: (pixel - mean) * float32(1 / std)",
    "torchvision": "the uint8 RGB image is normalised per channel in float32, (pixel / 255 - mean / 255) / "
                   "(std / 255), then the float image is resized bilinearly to (new_h, new_w) with half-pixel "
                   "centres (source = (dest + 0.5) * in / out - 0.5, clamped to the edges), no antialiasing",
}



def make_spec(spec: DetectorSpec, *, name: str, batch: int, files: dict[str, str], weights: str,
              opset: int | None) -> dict[str, Any]:
    """model.json's content: how to feed the program and read it (retina_fn.export's docstring describes the
    tensors), and the detector's spec ('detector_spec', what `Predictor(folder)` runs with).

    Args:
      spec: the export's detector (`program.export_spec`).
      name: what to call it (the config's name, or the weights file's).
      batch: N, images per call.
      files: {'exported': file name, 'onnx': file name}, those written.
      weights: the weights file the parameters came from (its base name is recorded).
      opset: the ONNX opset, or None without ONNX.

    Returns:
      A JSON-serialisable dict.
    """
    h, w = spec.input.landscape_canvas
    m = int(spec.test.max_per_img)
    mode = spec.input.resize_mode
    test = spec.test
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "name": str(name),
        "weights": os.path.basename(weights),
        "files": dict(files),
        "onnx_opset": opset,
        "batch": batch,
        "canvas": [h, w],
        "precision": "float32",
        "max_detections": m,
        "inputs": [
            {"name": "image", "dtype": "float32", "shape": [batch, 3, h, w],
             "meaning": "normalised RGB (see preprocess), each resized image at the top left, zero elsewhere"},
            {"name": "image_hw", "dtype": "int64", "shape": [batch, 2], "meaning": "(h, w) of each resized image"},
            {"name": "scale_factor", "dtype": "float32", "shape": [batch, 2],
             "meaning": "(new_w / w, new_h / h): resized over original size; (1, 1) gives boxes in canvas pixels"},
        ],
        "outputs": [
            {"name": "boxes", "dtype": "float32", "shape": [batch, m, 4],
             "meaning": "x1, y1, x2, y2 in original-image pixels"},
            {"name": "scores", "dtype": "float32", "shape": [batch, m], "meaning": "descending probabilities"},
            {"name": "labels", "dtype": "int64", "shape": [batch, m], "meaning": "class index into label_map"},
            {"name": "valid", "dtype": "bool", "shape": [batch, m],
             "meaning": "True for real detections (the first rows); padding rows are zero"},
        ],
        "preprocess": {
            "resize_mode": mode,
            "scale": [int(v) for v in spec.input.scale],
            "mean": [float(v) for v in spec.input.mean],
            "std": [float(v) for v in spec.input.std],
            "color": "RGB",
            "size": _SIZE_RULES[mode].replace("long_max", f"long_max={max(spec.input.scale)}")
                                     .replace("short_max", f"short_max={min(spec.input.scale)}"),
            "resize": _RESIZES[mode],
            "pad": f"the normalised image at rows < new_h and columns < new_w of a zero [3, {h}, {w}] canvas",
        },
        "boxes_to_original": "done inside: boxes are divided by (sx, sy, sx, sy) from scale_factor; not clipped "
                             "afterwards (they are clipped to image_hw before the division)",
        "label_map": {"category_ids": [int(i) for i in spec.category_ids], "names": [str(n) for n in spec.names]},
        "postprocess": {"score_thr": float(test.score_thr), "nms_iou": float(test.nms_iou),
                        "nms_pre": int(test.nms_pre), "pre_select": str(test.pre_select),
                        "max_per_img": m, "max_candidates": int(test.max_candidates)},
        "detector_spec": spec.to_json(),
    }


def detector_spec(meta: dict[str, Any], directory: str) -> DetectorSpec:
    """The detector an export folder's program computes (its model.json's 'detector_spec'), checked.

    Raises:
      InputFormatError: model.json has none, or one no config could hold.
    """
    if "detector_spec" not in meta:
        raise errors.InputFormatError(f"{directory}/{SPEC_FILE} has no detector_spec (written by an older "
                                      f"experiments.export): export the weights again")
    return schema.spec_from_json(meta["detector_spec"], f"{directory}/{SPEC_FILE}")


def read_spec(directory: str) -> dict[str, Any]:
    """The model.json of an export folder.

    Args:
      directory: a folder written by experiments.export.

    Returns:
      The spec (`make_spec`'s dict).

    Raises:
      MissingFileError (a FileNotFoundError): no model.json in the folder; InputFormatError (a ValueError): not
      an export of this format and version.
    """
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"{directory} has no {SPEC_FILE}: not a folder written by experiments.export")
    with open(path) as f:
        try:
            spec = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise errors.InputFormatError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(spec, dict):
        raise errors.InputFormatError(f"{path}: the top level must be an object, got {type(spec).__name__}")
    if spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
        raise errors.InputFormatError(f"{path}: format {spec.get('format')!r} version {spec.get('version')!r}; "
                                      f"expected {SPEC_FORMAT!r} version {SPEC_VERSION}")
    return spec


def transform_config(spec: dict[str, Any]) -> transforms.TransformConfig:
    """The input pipeline an export expects: its resize mode, scale, mean and std, onto its one canvas.

    Args:
      spec: `read_spec`'s dict.

    Returns:
      A TransformConfig whose landscape and portrait canvases are both the export's canvas (no flip).
    """
    pre = spec["preprocess"]
    canvas = tuple(int(v) for v in spec["canvas"])
    return transforms.TransformConfig(scale=tuple(pre["scale"]), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                      flip_prob=0.0, landscape_canvas=canvas, portrait_canvas=canvas,
                                      resize_mode=pre["resize_mode"])


_ARCHIVE_FILES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                            r"models/model\.json|data/(weights|constants)/model_(weights|constants)_config\.json|"
                            r"data/sample_inputs/model\.pt|data/(weights|constants)/(weight|tensor)_\d+)")
_RECORD = re.compile(r"(weight|tensor)_\d+")


def check_archive(path: str) -> None:
    """Refuses a .pt2 that torch.export.load would unpickle anything of, before it is opened by torch.

    Allowed: the archive's JSON files, raw tensor records that its configs name with use_pickle false, and an
    empty sample-inputs record (experiments.export writes none); anything else (pickled constants, weights or
    sample inputs, custom objects, compiled AOTInductor code) is refused. Every entry is read (its CRC checked).

    Raises:
      InputFormatError: naming the file and the entry at fault.
    """
    def fail(what):
        raise errors.InputFormatError(f"{path}: {what}; refused unloaded (nothing of it was run): export the "
                                      f"weights again with experiments.export")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            names = [e.filename for e in entries]
            prefix = names[0].split("/")[0] + "/" if names else ""
            if len(set(names)) != len(names) or not all(n.startswith(prefix) for n in names):
                fail("a zip archive whose entries are duplicated or not under one folder")
            records, named = {}, set()
            for entry in entries:
                rel = entry.filename[len(prefix):]
                if not _ARCHIVE_FILES.fullmatch(rel):
                    fail(f"entry {entry.filename} is not part of a torch.export program of tensors")
                data = archive.read(entry)
                if rel.endswith(".json") and "/model_" in rel:
                    for key, item in json.loads(data)["config"].items():
                        if item.get("use_pickle") is not False or not _RECORD.fullmatch(str(item.get("path_name"))):
                            fail(f"entry {entry.filename}: {key} is stored pickled or as an object")
                        named.add(rel.rsplit("/", 1)[0] + "/" + str(item.get("path_name")))
                elif rel.startswith("data/sample_inputs/") and data:
                    fail(f"entry {entry.filename} holds pickled sample inputs")
                elif rel.startswith("data/") and not rel.endswith((".json", ".pt")):
                    records[rel] = entry.filename
            for rel, name in records.items():
                if rel not in named:
                    fail(f"entry {name} is no tensor record of the program")
    except errors.InputFormatError:
        raise
    except zipfile.BadZipFile as e:
        raise errors.InputFormatError(f"{path}: not a torch.export program (truncated or not a zip archive: "
                                      f"{e}): export the weights again") from None
    except (KeyError, TypeError, AttributeError, ValueError, zlib.error) as e:  # a config of the wrong shape, a CRC
        fail(f"a corrupt archive ({type(e).__name__}: {e})")


def load_program(directory: str, spec: dict[str, Any]) -> Callable[[dict], Detections]:
    """The torch.export program of a folder as `run(batch) -> Detections`.

    Args:
      directory: the export folder.
      spec: its `read_spec`.

    Returns:
      run(batch): batch holds image float32 [B, 3, H, W], image_hw int64 [B, 2] and scale_factor float32
      [B, 2] on the export's canvas, 1 <= B <= N (fewer than N images are padded with copies of the first,
      whose rows are dropped); returns Detections with B rows (ValueError for another B).

    Raises:
      MissingFileError (a FileNotFoundError): the folder has no .pt2 (exported with --format onnx).
      InputFormatError: a .pt2 that would unpickle anything (`check_archive`), is corrupt, or holds a
        non-finite tensor.
    """
    name = spec["files"].get("exported")
    if name is None:
        raise errors.MissingFileError(f"{directory} holds no torch.export program (it was exported with --format "
                                      f"onnx); export with --format exported or both")
    path = os.path.join(directory, name)
    check_archive(path)
    try:
        exported = torch.export.load(path)
    except Exception as e:  # the archive's parts passed check_archive: a broken graph or tensor record
        raise errors.InputFormatError(f"{path}: cannot load the exported program ({str(e).strip()[:200]}): "
                                      f"export the weights again") from e
    for key, t in {**exported.state_dict, **exported.constants}.items():
        if isinstance(t, torch.Tensor):
            checkpoint.nonfinite_refusal(t, f"tensor {key!r}", path, errors.InputFormatError)
    program = exported.module()
    size = int(spec["batch"])

    def run(batch: dict) -> Detections:
        count = batch["image"].shape[0]
        if not 1 <= count <= size:
            raise ValueError(f"the exported program takes 1 to {size} images per call, got {count}")
        args = [batch[key] for key in INPUT_NAMES]
        if count < size:
            args = [torch.cat([a, a[:1].expand(size - count, *a.shape[1:])]) for a in args]
        with torch.no_grad():
            outputs = program(*args)
        return Detections(*(t[:count] for t in outputs))

    return run
