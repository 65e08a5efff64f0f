"""A detector to call on images in memory, with the weights read once: the library's counterpart of
mmdetection's `init_detector` + `inference_detector` and torchvision's `model.eval(); model([img])`.

    predictor = Predictor("configs/demo.py", "runs/demo/checkpoints/ckpt_000000960.pt")
    found = predictor(Image.open("a.jpg"))              # one image -> one Prediction
    found = predictor([array_hwc, tensor_chw, pil])     # a list -> a list, in order
    found[0].boxes, found[0].scores, found[0].labels, found[0].names

Construction reads the config (a ConfigDict, or a config file as the programs' --config takes), the weights
(any format `retina_fn.interop.load_detector_weights` reads: a retina_fn checkpoint, torchvision or
mmdetection RetinaNet files) and the class names that go with them (`label_table`); model.num_classes='auto'
becomes the weights' class count (`retina_fn.interop.count_in_weights`) in the predictor's own copy of the
config. A call converts each image to uint8 RGB (`retina_fn.data.image_input`) and runs the evaluation
pipeline unchanged: the configured resize and normalisation onto the aspect group's fixed canvas
(`transforms.preprocess_for_inference`), images of one canvas batched by data.eval_images_per_device, the
eval step of `retina_fn.train.make_eval_step` with model.test's post-processing, boxes divided back into
original pixels. The eval step is built once per canvas shape, on first use, and reused by later calls.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from retina_fn import tree
from retina_fn.data import transforms
from retina_fn.data.image_input import as_rgb_uint8
from retina_fn.data.resize import check_canvases_fit
from retina_fn.interop.weights import count_in_weights, label_table, load_detector_weights
from retina_fn.parallel.backend import select_device
from retina_fn.postprocess import Detections
from retina_fn.train import make_eval_step

log = logging.getLogger(__name__)

AUTO = "auto"  # model.num_classes taken from the weights


class Prediction(NamedTuple):
    """One image's detections, sorted by score (descending).

    Attributes:
        boxes: float32 [N, 4] x1, y1, x2, y2 in the pixels of the image as given.
        scores: float32 [N], above model.test.score_thr.
        labels: int64 [N], class index 0..K-1.
        names: N str, the class name of each detection.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]


def load_config(config):
    """A config, given as one or as the path of a config file.

    Args:
        config: a ConfigDict (returned as is), or the path of a Python file whose get_config() returns one
            (configs/*.py; the file is run as a module, as the programs' --config flag runs it).

    Returns:
        The ConfigDict.

    Raises:
        FileNotFoundError: no such file. ValueError: the file has no get_config().
    """
    if not isinstance(config, (str, os.PathLike)):
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "_retina_fn_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {path} defines no get_config()")
    return get_config()


def canvas_batches(samples: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Which samples go into which batch: grouped by canvas shape, in input order within a group.

    Args:
        samples: `transforms.preprocess_for_inference` dicts (image [3, H, W]).
        batch_size: the most samples per batch.

    Returns:
        Lists of sample indices; each list shares one canvas and has at most batch_size entries.
    """
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(tuple(sample["image"].shape), []).append(i)
    return [index[k:k + batch_size] for index in groups.values() for k in range(0, len(index), batch_size)]


def run_batches(run: Callable[[dict], Detections], samples: Sequence[dict], batch_size: int,
                device: torch.device | str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detections for every sample, batch by batch on each canvas (`canvas_batches`).

    Args:
        run: batch -> Detections with boxes in original pixels; the batch holds image [B, 3, H, W] (float32,
            or uint8 with data.uint8_canvas), image_hw int64 [B, 2] and scale_factor float32 [B, 2] on `device`.
        samples: `transforms.preprocess_for_inference` dicts.
        batch_size: the most samples per batch.
        device: where the batches go.

    Returns:
        Per sample, in input order: (boxes float32 [N, 4], scores float32 [N], labels int64 [N]), the valid
        rows of its Detections.
    """
    out: list = [None] * len(samples)
    for index in canvas_batches(samples, batch_size):
        batch = {key: torch.from_numpy(np.stack([samples[i][key] for i in index])).to(device)
                 for key in ("image", "image_hw", "scale_factor")}
        found = run(batch)
        boxes, scores, labels, valid = (t.cpu().numpy() for t in (found.boxes, found.scores, found.labels,
                                                                  found.valid))
        for row, i in enumerate(index):
            keep = valid[row]
            out[i] = (boxes[row][keep], scores[row][keep], labels[row][keep])
    return out


class Predictor:
    """RetinaNet with its weights loaded, called on images in memory (see the module docstring).

    Attributes:
        cfg: the predictor's own copy of the config, model.num_classes resolved.
        params: the parameter tree, float32 on `device`.
        meta: a retina_fn checkpoint's metadata ({} for other weights); format: the weights' format.
        category_ids, names: the category id and name of each class index (`label_table`).
        device: where the model runs.
        batch_size: images per forward pass.
        canvas_mode: 'fixed' (the aspect group's canvas, as evaluation) or 'tight' (the resized image
            padded to model.size_divisor: a canvas shape per image size).
    """

    def __init__(self, config, weights: str | os.PathLike, *, device: torch.device | str | None = None,
                 batch_size: int | None = None, canvas_mode: str = "fixed"):
        """Reads the config and the weights.

        Args:
            config: a ConfigDict or a config file's path (`load_config`); not modified.
            weights: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
            device: a torch device; None: cfg.dist.device ('auto': an NPU, else CUDA, else the CPU).
            batch_size: images per forward pass; None: data.eval_images_per_device.
            canvas_mode: 'fixed' or 'tight' (`transforms.CANVAS_MODES`).

        Raises:
            ValueError: an unknown canvas mode, a batch size below 1, fixed canvases that cannot hold the
                configured scale, or a stored label map of another class count; FileNotFoundError and
                CheckpointMismatch (weights that do not fit the config) from the weights.
        """
        cfg = copy.deepcopy(load_config(config))
        if canvas_mode not in transforms.CANVAS_MODES:
            raise ValueError(f"canvas_mode must be one of {transforms.CANVAS_MODES}, got {canvas_mode!r}")
        if canvas_mode == "fixed":
            check_canvases_fit(cfg.data)
        self.batch_size = int(cfg.data.eval_images_per_device if batch_size is None else batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        weights = os.fspath(weights)
        if isinstance(cfg.model.num_classes, str) and cfg.model.num_classes == AUTO:
            count, source = count_in_weights(weights, cfg.model)
            cfg.model.num_classes = count
            log.info("model.num_classes='auto': %d classes, from %s", count, source)
        self.cfg, self.canvas_mode = cfg, canvas_mode
        self.transform_cfg = transforms.TransformConfig.from_config(cfg.data)
        self.device = torch.device(device) if device is not None else select_device(cfg.dist.device).device
        loaded = load_detector_weights(weights, cfg.model)
        self.params = tree.cast(loaded.params, torch.float32, self.device)
        self.meta, self.format = loaded.meta, loaded.format
        self.category_ids, self.names = label_table(int(cfg.model.num_classes), loaded.meta)
        self._steps: dict[tuple[int, int], Callable[[dict, dict], Detections]] = {}
        log.info("%s (%s weights, %d classes) on %s", weights, loaded.format, len(self.names), self.device)

    @property
    def canvases(self) -> tuple[tuple[int, int], ...]:
        """The canvas shapes (H, W) whose eval step has been built, in the order they were first used."""
        return tuple(self._steps)

    def step(self, canvas_hw: tuple[int, int]) -> Callable[[dict, dict], Detections]:
        """The eval step for batches on one canvas shape, built on its first use and kept.

        Args:
            canvas_hw: (H, W) of the canvas.

        Returns:
            `make_eval_step(cfg, device)`'s eval_step(params, batch) -> Detections.
        """
        key = (int(canvas_hw[0]), int(canvas_hw[1]))
        if key not in self._steps:
            self._steps[key] = make_eval_step(self.cfg, device=self.device)
        return self._steps[key]

    def preprocess(self, image: np.ndarray, what: str = "the image") -> dict:
        """The evaluation transform of one uint8 RGB image [h, w, 3] on this predictor's canvas
        (`transforms.preprocess_for_inference`'s dict: image [3, H, W], image_hw, orig_hw, scale_factor);
        `what` names the image in errors."""
        return transforms.preprocess_for_inference(image, self.transform_cfg, self.canvas_mode,
                                                   int(self.cfg.model.size_divisor), what)

    def __call__(self, images) -> Prediction | list[Prediction]:
        """Detections for one image or a list of images of any sizes.

        Args:
            images: one image (numpy HWC, torch CHW, PIL; see `retina_fn.data.image_input`) or a list or
                tuple of them.

        Returns:
            A Prediction for one image; a list of Predictions, in order, for a list.

        Raises:
            TypeError, ValueError: naming the image (its position in a list) that cannot be taken.
        """
        listed = isinstance(images, (list, tuple))
        names = [f"image {i} of the list" for i in range(len(images))] if listed else ["the image"]
        pixels = [as_rgb_uint8(image, name) for image, name in zip(images if listed else [images], names)]
        samples = [self.preprocess(p, name) for p, name in zip(pixels, names)]

        def run(batch: dict) -> Detections:
            return self.step(tuple(batch["image"].shape[-2:]))(self.params, batch)

        found = [Prediction(boxes, scores, labels, tuple(self.names[int(k)] for k in labels))
                 for boxes, scores, labels in run_batches(run, samples, self.batch_size, self.device)]
        return found if isinstance(images, (list, tuple)) else found[0]
