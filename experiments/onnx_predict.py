"""Detections from an exported ONNX model with numpy, Pillow and onnxruntime only: no torch, no retina_fn.

    python experiments/onnx_predict.py exported/demo a.jpg b.png --score-thr 0.3 --out dets.json [--repeat 20]

Images are prepared as model.json's 'preprocess' says; boxes come back in original-image pixels. The 'mmdet'
resize is the pipeline's uint8 resize bit for bit on x86 (torch's CPU kernel: separable bilinear, half-pixel
centres, horizontal pass first, fixed-point weights, each pass rounded to uint8); 'torchvision' resizes the
normalised float32 image, within about 1e-6 of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

_FIXED_POINT_LIMIT = 1 << 15  # the weights are int16
_MAX_PRECISION = 22


class Prepared(NamedTuple):
    """One image ready for the model: image float32 [3, H, W], image_hw int64 [2], scale_factor float32 [2]."""

    image: np.ndarray
    image_hw: np.ndarray
    scale_factor: np.ndarray


class ImageDetections(NamedTuple):
    """One image's detections: boxes float32 [n, 4] xyxy in original pixels, scores [n], labels int64 [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def read_spec(directory: str) -> dict:
    """The export's model.json; ValueError when it holds no ONNX model."""
    with open(os.path.join(directory, "model.json")) as f:
        spec = json.load(f)
    if "onnx" not in spec.get("files", {}):
        raise ValueError(f"{directory} holds no ONNX model: export with --format onnx or both")
    return spec


def resized_size(height: int, width: int, preprocess: dict) -> tuple[int, int]:
    """(new_h, new_w) of an image under the export's size rule (model.json 'preprocess': 'size')."""
    long_max, short_max = max(preprocess["scale"]), min(preprocess["scale"])
    s = min(long_max / max(height, width), short_max / min(height, width))
    if preprocess["resize_mode"] == "mmdet":
        return int(height * s + 0.5), int(width * s + 0.5)
    return int(height * s), int(width * s)


def _fixed_point_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Two taps per output of the uint8 bilinear resize along one axis, as integer weights: output i is centred
    at c = (i + 0.5) * n_in / n_out, taps at first = max(trunc(c - 0.5), 0) and first + 1 weighted
    max(0, 1 - |tap + 0.5 - c|) (none past the edge), normalised, scaled by 2**precision, the largest precision
    (<= 22) at which twice the largest weight fits an int16. -> (first, second, w0, w1: int64 [n_out], precision)."""
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)
    first = np.maximum((centre - 0.5).astype(np.int64), 0)  # astype truncates toward zero
    last = np.minimum((centre + 1.5).astype(np.int64), n_in)  # one past the last tap
    w0 = np.maximum(0.0, 1.0 - np.abs(first + 0.5 - centre))
    w1 = np.where(first + 1 < last, np.maximum(0.0, 1.0 - np.abs(first + 1.5 - centre)), 0.0)
    total = w0 + w1
    w0, w1 = w0 / total, w1 / total
    largest = max(w0.max(), w1.max())
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + largest * (1 << (precision + 1))) < _FIXED_POINT_LIMIT:
        precision += 1
    scale = float(1 << precision)
    return (first, np.minimum(first + 1, n_in - 1), np.floor(0.5 + w0 * scale).astype(np.int64),
            np.floor(0.5 + w1 * scale).astype(np.int64), precision)


def _resize_axis_uint8(image: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    if image.shape[axis] == n_out:
        return image
    first, second, w0, w1, precision = _fixed_point_taps(image.shape[axis], n_out)
    pixels = image.astype(np.int64)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    acc = (np.take(pixels, first, axis=axis) * w0.reshape(shape) + np.take(pixels, second, axis=axis)
           * w1.reshape(shape) + (1 << (precision - 1)))
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_uint8(image: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """The 'mmdet' resize: uint8 [h, w, 3] -> uint8 [new_h, new_w, 3] (see the module docstring)."""
    return _resize_axis_uint8(_resize_axis_uint8(image, int(size_hw[1]), axis=1), int(size_hw[0]), axis=0)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear taps: source = max(scale * (i + 0.5) - 0.5, 0) with the float32 scale n_in / n_out,
    rounded to float32 once (as torch's CPU kernel); (first int64 [n_out], next clamped, source - first float32)."""
    scale = float(np.float32(n_in) / np.float32(n_out))
    source = np.maximum(((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
    first = np.minimum(source.astype(np.int64), n_in - 1)
    return first, np.minimum(first + 1, n_in - 1), (source - first).astype(np.float32)


def resize_float(planes: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """The 'torchvision' resize of a normalised image: float32 [3, h, w] -> float32 [3, new_h, new_w],
    bilinear with half-pixel centres, no antialiasing."""
    y0, y1, ty = _linear_taps(planes.shape[1], int(size_hw[0]))
    x0, x1, tx = _linear_taps(planes.shape[2], int(size_hw[1]))
    one = np.float32(1)
    top = planes[:, y0][:, :, x0] * (one - tx) + planes[:, y0][:, :, x1] * tx
    bottom = planes[:, y1][:, :, x0] * (one - tx) + planes[:, y1][:, :, x1] * tx
    return (top * (one - ty)[:, None] + bottom * ty[:, None]).astype(np.float32)


def prepare(image: np.ndarray, spec: dict) -> Prepared:
    """One uint8 RGB image [h, w, 3] -> its model inputs per model.json 'preprocess'; ValueError for an unknown
    resize mode or a resized image larger than the canvas."""
    pre = spec["preprocess"]
    h, w = image.shape[:2]
    new_h, new_w = resized_size(h, w, pre)
    canvas_h, canvas_w = spec["canvas"]
    if new_h > canvas_h or new_w > canvas_w:
        raise ValueError(f"resized image {new_h}x{new_w} does not fit the canvas {canvas_h}x{canvas_w}")
    mean = np.asarray(pre["mean"], np.float32)[:, None, None]
    if pre["resize_mode"] == "mmdet":
        inv_std = (1.0 / np.asarray(pre["std"], np.float64)).astype(np.float32)[:, None, None]
        pixels = resize_uint8(image, (new_h, new_w)).transpose(2, 0, 1).astype(np.float32)
        normalised = (pixels - mean) * inv_std
    elif pre["resize_mode"] == "torchvision":
        mean01 = (np.asarray(pre["mean"], np.float64) / 255.0).astype(np.float32)[:, None, None]
        std01 = (np.asarray(pre["std"], np.float64) / 255.0).astype(np.float32)[:, None, None]
        planes = (image.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean01) / std01
        normalised = resize_float(planes, (new_h, new_w))
    else:
        raise ValueError(f"unknown resize mode {pre['resize_mode']!r}")
    canvas = np.zeros((3, canvas_h, canvas_w), np.float32)
    canvas[:, :new_h, :new_w] = normalised
    return Prepared(canvas, np.array([new_h, new_w], np.int64), np.array([new_w / w, new_h / h], np.float32))


def detect(session, spec: dict, prepared: Sequence[Prepared]) -> list[ImageDetections]:
    """The ImageDetections of every prepared image, in batches of the export's N (the last one padded)."""
    size = int(spec["batch"])
    out = []
    for start in range(0, len(prepared), size):
        chunk = list(prepared[start:start + size])
        padded = chunk + [chunk[0]] * (size - len(chunk))
        feed = {name: np.stack([getattr(p, name) for p in padded]) for name in Prepared._fields}
        boxes, scores, labels, valid = session.run(["boxes", "scores", "labels", "valid"], feed)
        out += [ImageDetections(boxes[row][keep], scores[row][keep], labels[row][keep])
                for row, keep in enumerate(valid[:len(chunk)])]
    return out


def to_results(detections: Sequence[ImageDetections], paths: Sequence[str], spec: dict) -> list[dict]:
    """experiments.predict's COCO result list: image_id = position, bbox [x, y, w, h], model.json's category ids."""
    ids = spec["label_map"]["category_ids"]
    return [{"image_id": i, "file_name": os.path.basename(path), "category_id": int(ids[label]),
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
            for i, (det, path) in enumerate(zip(detections, paths))
            for (x1, y1, x2, y2), score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="a folder written by experiments.export with model.onnx")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--score-thr", type=float, default=0.3, help="lowest score printed (default 0.3)")
    parser.add_argument("--out", help="write every detection as a COCO result list (JSON) here")
    parser.add_argument("--repeat", type=int, default=0, help="print images/s of this many runs of the first batch")
    args = parser.parse_args(argv)

    import onnxruntime  # noqa: PLC0415 - imported late so --help works without it

    spec = read_spec(args.export_dir)
    session = onnxruntime.InferenceSession(os.path.join(args.export_dir, spec["files"]["onnx"]),
                                           providers=["CPUExecutionProvider"])
    prepared = [prepare(np.asarray(Image.open(p).convert("RGB")), spec) for p in args.images]
    detections = detect(session, spec, prepared)
    names = spec["label_map"]["names"]
    for path, det in zip(args.images, detections):
        shown = det.scores >= args.score_thr
        print(f"{path}: {len(det.scores)} detections, {int(shown.sum())} with score >= {args.score_thr}")
        for box, score, label in zip(det.boxes[shown], det.scores[shown], det.labels[shown]):
            print(f"  {names[label]:>16s} {score:.3f}  [{', '.join(f'{v:.1f}' for v in box)}]")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(to_results(detections, args.images, spec), f)
    if args.repeat > 0:
        first = prepared[:int(spec["batch"])]
        detect(session, spec, first)
        started = time.perf_counter()
        for _ in range(args.repeat):
            detect(session, spec, first)
        rate = len(first) * args.repeat / (time.perf_counter() - started)
        print(f"onnxruntime: {rate:.2f} images/s ({args.repeat} runs of {len(first)} image(s) on a "
              f"{spec['canvas'][0]}x{spec['canvas'][1]} canvas, batch {spec['batch']})")


if __name__ == "__main__":
    main()
