"""A map-style torch Dataset from SampleRefs to transformed samples (numpy arrays, one image each).

The augmentation key of dataset index i in epoch e is fold_in(fold_in(key, e), i), so a sample does not
depend on the number of workers or replicas. An unreadable image raises `ImageLoadError`; with
`skip_bad_images` (training only) it is replaced, deterministically and with a warning, by the next
readable image of its aspect group (same canvas), and the sample carries `replaced=True`."""

from __future__ import annotations

import logging

import numpy as np
import torch

from retina_fn import rng
from retina_fn.data import transforms
from retina_fn.data.coco import CocoFormatError, CocoSet, ImageLoadError, load_record_image
from retina_fn.data.sampler import SampleRef

logger = logging.getLogger(__name__)


class DetectionDataset(torch.utils.data.Dataset):
    """Samples of a CocoSet under the 1x pipeline.

    train: flip with the per-sample key (int64 [2] `key`) and allow `skip_bad_images`; otherwise the eval
    pipeline, padding refs becoming blank samples (image_id -1). preload: decode every image up front.
    A sample: image float32 [3, H, W] (uint8 with cfg.uint8_canvas); boxes float32 [N, 4]; labels int64 [N];
    ignore_boxes float32 [M, 4]; image_hw, orig_hw int64 [2]; scale_factor float32 [2]; flipped bool;
    image_id, index int; replaced bool. ResizeError at construction for an image resized to a 0-pixel side."""

    def __init__(self, coco: CocoSet, cfg: transforms.TransformConfig, *, train: bool,
                 key: torch.Tensor | None = None, skip_bad_images: bool = False, preload: bool = False):
        if train and key is None:
            raise ValueError("a training dataset needs an augmentation key")
        if len(coco) == 0:
            raise CocoFormatError(f"{coco.ann_file}: no images left after filtering (images without annotations "
                                  f"are left out with data.filter_empty_gt, small ones with data.min_size)")
        transforms.check_resizable(coco.records, cfg, coco.ann_file)
        self.coco, self.cfg, self.train, self.key = coco, cfg, train, key
        self.skip_bad_images = skip_bad_images and train
        self.groups = np.array([int(transforms.is_landscape(r.height, r.width)) for r in coco.records], dtype=np.int64)
        self._images = [self._decode_or_error(i) for i in range(len(coco))] if preload else None

    def __len__(self) -> int:
        return len(self.coco)

    def _decode_or_error(self, index: int):
        try:
            return load_record_image(self.coco.records[index])
        except ImageLoadError as e:
            if not self.skip_bad_images:
                raise
            return e

    def _image(self, index: int) -> np.ndarray:
        image = self._images[index] if self._images is not None else self._decode_or_error(index)
        if isinstance(image, ImageLoadError):
            raise image
        return image

    def _readable(self, index: int) -> tuple[int, np.ndarray, bool]:
        """(index used, its image, replaced?), walking the aspect group from `index`."""
        try:
            return index, self._image(index), False
        except ImageLoadError as first:
            if not self.skip_bad_images:
                raise
            members = np.flatnonzero(self.groups == self.groups[index])
            start = int(np.searchsorted(members, index))
            for step in range(1, members.size):
                candidate = int(members[(start + step) % members.size])
                try:
                    image = self._image(candidate)
                except ImageLoadError:
                    continue
                logger.warning("skipping unreadable image (%s); index %d stands in for index %d", first,
                               candidate, index)
                return candidate, image, True
            raise ImageLoadError(f"no readable image in the aspect group of {first.path} (image id "
                                 f"{first.image_id}): {first}", first.path, first.image_id) from first

    def sample_key(self, index: int, epoch: int) -> torch.Tensor:
        """The augmentation key of dataset index `index` in `epoch`."""
        return rng.fold_in(rng.fold_in(self.key, epoch), index)

    def blank_sample(self, index: int) -> dict:
        """An empty evaluation slot on the canvas of `index`'s group: zero image, no boxes, image_id and index -1."""
        record = self.coco.records[index]
        canvas = transforms.canvas_for(record.height, record.width, self.cfg)
        return dict(image=np.zeros((3, *canvas), dtype=transforms.canvas_dtype(self.cfg)),
                    boxes=np.zeros((0, 4), np.float32), labels=np.zeros((0,), np.int64),
                    ignore_boxes=np.zeros((0, 4), np.float32),
                    image_hw=np.array(canvas, np.int64), orig_hw=np.array(canvas, np.int64),
                    scale_factor=np.ones(2, np.float32), flipped=False, image_id=-1, index=-1, replaced=False)

    def __getitem__(self, ref) -> dict:
        """ref: a SampleRef, or a plain index (epoch 0, not padding)."""
        if not isinstance(ref, SampleRef):
            ref = SampleRef(int(ref), 0, False)
        if ref.padding and not self.train:
            return self.blank_sample(ref.index)
        index, image, replaced = self._readable(ref.index)
        record = self.coco.records[index]
        if self.train:
            out = transforms.train_transform(image, record.boxes, record.ignore_boxes, self.cfg,
                                             self.sample_key(index, ref.epoch))
        else:
            out = transforms.eval_transform(image, record.boxes, record.ignore_boxes, self.cfg)
        out.update(labels=record.labels, image_id=record.image_id, index=index, replaced=replaced)
        return out
