"""A detector to call on images in memory, with the weights read once: the library's counterpart of
mmdetection's `init_detector` + `inference_detector` and torchvision's `model.eval(); model([img])`.

    predictor = Predictor("runs/demo/checkpoints/ckpt_000002655.pt")   # the checkpoint's own detector
    found = predictor(Image.open("a.jpg"))              # one image -> one Prediction
    found = predictor([array_hwc, tensor_chw, pil])     # a list -> a list, in order
    found[0].boxes, found[0].scores, found[0].labels, found[0].names
    Predictor("exported/demo")                          # an export folder: its torch.export program
    Predictor("retinanet_resnet50_fpn_coco-eeacb38b.pth", config="configs/torchvision_retinanet_v1.py")

Construction reads the weights and the detector's spec (retina_fn.trained: the one a checkpoint stores, a
config's for weights that store none, or the reference layout of torchvision and mmdetection files; a config
given with a checkpoint must agree with its spec but for the fields named in `use_config_for`). A call converts
each image to uint8 RGB (`retina_fn.data.image_input`) and runs the evaluation pipeline: the spec's resize and
normalisation onto the aspect group's fixed canvas (`transforms.preprocess_for_inference`), images of one canvas
batched together, the eval step of `retina_fn.train.make_eval_step` with the spec's post-processing, boxes
divided back into original pixels.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from retina_fn import checkpoint, errors, tree, trained
from retina_fn.data import transforms
from retina_fn.data.image_input import as_rgb_uint8
from retina_fn.export import folder as export_folder
from retina_fn.parallel.backend import select_device
from retina_fn.postprocess import Detections
from retina_fn.train import make_eval_step

log = logging.getLogger(__name__)


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


def _is_run_folder(path: str) -> bool:
    """Whether a folder holds checkpoints (a run folder, or its checkpoints/) rather than an export."""
    return not os.path.exists(os.path.join(path, export_folder.SPEC_FILE)) and bool(
        checkpoint.list_checkpoints(os.path.join(path, "checkpoints")) or checkpoint.list_checkpoints(path))


class Predictor:
    """RetinaNet with its weights loaded, called on images in memory (see the module docstring).

    Attributes:
        spec: the detector's spec (retina_fn.spec.DetectorSpec; an export folder's for an export).
        params: the parameter tree, float32 on `device` ({} for an export folder).
        meta: a retina_fn checkpoint's metadata ({} for other weights); format: the weights' format ('exported'
            for an export folder).
        category_ids, names: the category id and name of each class index.
        device: where the model runs (the CPU for an export folder).
        batch_size: images per forward pass.
        canvas_mode: 'fixed' (the aspect group's canvas, as evaluation) or 'tight' (the resized image padded to
            spec.size_divisor: a canvas shape per image size).
    """

    def __init__(self, weights: str | os.PathLike, config=None, *, use_config_for: Sequence[str] = (),
                 device: torch.device | str | None = None, batch_size: int | None = None,
                 canvas_mode: str = "fixed", precision: str = "fp32"):
        """Reads the weights and their spec.

        Args:
            weights: a retina_fn checkpoint (or run folder), torchvision / mmdetection RetinaNet weights, or an
                export folder (written by experiments.export).
            config: a ConfigDict or a config file's path (`load_config`), or None (the weights' own spec).
            use_config_for: config fields whose values the config gives instead of the checkpoint's spec
                ('model.test.score_thr', or 'all'; see retina_fn.trained).
            device: a torch device; None: an NPU, else CUDA, else the CPU.
            batch_size: images per forward pass; None: 2 (an export folder: its own batch).
            canvas_mode: 'fixed' or 'tight' (`transforms.CANVAS_MODES`).
            precision: the forward's precision, 'fp32' | 'fp16' | 'bf16'.

        Raises:
            ConfigError: an unknown canvas mode, a batch size below 1, or a config that differs from the stored
                spec; MissingFileError and CheckpointMismatch from the weights.
        """
        if canvas_mode not in transforms.CANVAS_MODES:
            raise errors.ConfigError(f"canvas_mode must be one of {transforms.CANVAS_MODES}, got {canvas_mode!r}")
        weights = os.fspath(weights)
        self.canvas_mode = canvas_mode
        if os.path.isdir(weights) and not _is_run_folder(weights):
            self._from_export(weights, config, canvas_mode, batch_size)
        else:
            cfg = None if config is None else load_config(config)
            loaded = trained.load_trained(weights, cfg, use_config_for)
            self.spec, self.meta, self.format = loaded.spec, loaded.meta, loaded.format
            self.device = torch.device(device) if device is not None else select_device("auto").device
            self.params = tree.cast(loaded.params, torch.float32, self.device)
            self.batch_size = 2 if batch_size is None else int(batch_size)
            self._run = make_eval_step(self.spec, self.device, precision_name=precision)
        if self.batch_size < 1:
            raise errors.ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        self.category_ids, self.names = self.spec.category_ids, self.spec.names
        self.transform_cfg = transforms.TransformConfig.for_inference(self.spec.input)
        log.info("%s (%s, %d classes) on %s", weights, self.format, len(self.names), self.device)

    def _from_export(self, directory: str, config, canvas_mode: str, batch_size: int | None) -> None:
        if config is not None or canvas_mode != "fixed" or batch_size is not None:
            raise errors.ConfigError("an export folder runs with its own spec, canvas and batch: pass no config, "
                                     "tight canvas or batch size with it")
        meta = export_folder.read_spec(directory)
        self.spec = export_folder.detector_spec(meta, directory)
        self.meta, self.format, self.params, self.device = {}, "exported", {}, torch.device("cpu")
        self.batch_size = int(meta["batch"])
        program = export_folder.load_program(directory, meta)
        self._run = lambda params, batch: program(batch)

    def preprocess(self, image: np.ndarray, what: str = "the image") -> dict:
        """The evaluation transform of one uint8 RGB image [h, w, 3] on this predictor's canvas
        (`transforms.preprocess_for_inference`'s dict: image [3, H, W], image_hw, orig_hw, scale_factor);
        `what` names the image in errors."""
        return transforms.preprocess_for_inference(image, self.transform_cfg, self.canvas_mode,
                                                   int(self.spec.size_divisor), what)

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
        return self.predict_arrays(pixels, names) if listed else self.predict_arrays(pixels, names)[0]

    def predict_arrays(self, pixels: Sequence[np.ndarray], names: Sequence[str]) -> list[Prediction]:
        """Detections for uint8 RGB images [h, w, 3], in order; names[i] names image i in errors (a file's
        path, 'image i of the list')."""
        samples = [self.preprocess(p, name) for p, name in zip(pixels, names)]
        return [Prediction(boxes, scores, labels, tuple(self.names[int(k)] for k in labels))
                for boxes, scores, labels in run_batches(lambda batch: self._run(self.params, batch), samples,
                                                         self.batch_size, self.device)]
