"""retina_fn/data/images.py and the zero-size resize check: damaged data, paths that are not regular files,
images too long on one side or resized to nothing, each refused with one error naming the file and image id."""

from __future__ import annotations

import io
import re
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from experiments import predict
from retina_fn.data import coco, images, transforms
from retina_fn.data.dataset import DetectionDataset
from retina_fn.data.images import ImageLoadError, decode_image
from retina_fn.data.resize import ResizeError
from retina_fn.errors import UserError
from retina_fn.predictor import Predictor
from tests.coco_fixtures import ann_entry, coco_dict, image_entry, tiny_data_config, write_dataset, write_image
from tests.test_predict import config as predict_config
from tests.test_predict import labelled_checkpoint


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _grey_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of zeros, compressed a row at a time (a 170,000,000 x 1 one is 0.2 MB)."""
    compress, body = zlib.compressobj(9), []
    row = b"\x00" * (width + 1)  # the filter byte, then the samples
    for _ in range(height):
        body.append(compress.compress(row))
    body.append(compress.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(body)) + _chunk(b"IEND", b"")


def _damaged_png(pixels: np.ndarray) -> bytes:
    """A PNG of `pixels` whose compressed data is damaged past its start, with the chunk's CRC made to fit
    (so only the decoder can tell)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    tag = data.find(b"IDAT")
    length = struct.unpack(">I", data[tag - 4:tag])[0]
    for k in range(tag + 24, tag + 4 + length - 8, 7):
        data[k] ^= 0x5A
    data[tag + 4 + length:tag + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[tag:tag + 4 + length])))
    return bytes(data)


def test_damaged_compressed_data_is_an_error_not_a_black_image(tmp_path):
    # Pillow's PNG getexif() loads the pixels; read first and inside a catch-all, its decoder error would be
    # lost and the convert after it would return the partly decoded image (87.5 % black here).
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    (tmp_path / "bad.png").write_bytes(_damaged_png(pixels))
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*bad\.png \(image id 4\): "):
        decode_image(str(tmp_path / "bad.png"), 4)


def test_a_damaged_exif_block_is_still_ignored(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "exif.png", exif=b"Exif\x00\x00not a TIFF header")
    with Image.open(tmp_path / "exif.png") as im:
        im.load()
        with pytest.raises(SyntaxError):  # what Pillow's EXIF parser makes of it
            im.getexif()
    np.testing.assert_array_equal(decode_image(str(tmp_path / "exif.png"), 1, (6, 7)), pixels)


def test_a_fifo_a_folder_and_a_device_are_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "fifo.png")
    os.mkfifo(fifo)
    outcome: list = []

    def read():
        try:
            decode_image(fifo, 5)
        except Exception as e:  # the test looks at which one it was
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # blocked in open(): a writer lets it go, then the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ImageLoadError), outcome
    assert str(outcome[0]) == (f"cannot read image {fifo} (image id 5): not a regular file (a folder, FIFO, device "
                               f"or socket)")
    with pytest.raises(ImageLoadError, match=r"cannot read image .* \(image id 6\): not a regular file"):
        decode_image(str(tmp_path), 6)
    if os.path.exists("/dev/zero"):  # a device that never ends
        with pytest.raises(ImageLoadError, match=r"/dev/zero \(image id 7\): not a regular file"):
            decode_image("/dev/zero", 7)


def test_a_nul_byte_in_the_path_is_an_image_load_error():
    # The operating system takes no path with a NUL byte: os.stat raises ValueError.
    with pytest.raises(ImageLoadError, match=r"cannot read image 'a\\x00b\.png' \(image id 3\): ValueError: "
                                             r"embedded null byte"):
        decode_image("a\x00b.png", 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at 89,478,485 pixels
def test_a_170_million_by_1_png_is_refused_from_its_header(tmp_path, monkeypatch):
    # 170,000,000 pixels is under MAX_IMAGE_PIXELS; decoding it takes gigabytes (a MemoryError under a
    # memory limit) on the way to a resize that leaves a 0-pixel side. The header is enough to refuse it.
    (tmp_path / "strip.png").write_bytes(_grey_png(170_000_000, 1))

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match=r"image .*strip\.png \(image id 8\) is 170000000x1 \(w x h\), a side "
                                             r"over 1048576 pixels \(retina_fn\.data\.images\.MAX_IMAGE_SIDE"):
        decode_image(str(tmp_path / "strip.png"), 8)
    assert images.MAX_IMAGE_SIDE == 2**20  # OpenCV's CV_IO_MAX_IMAGE_WIDTH / _HEIGHT


def test_running_out_of_memory_while_decoding_names_the_image(tmp_path, monkeypatch):
    write_image(tmp_path / "big.png", 12, 10)

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*big\.png \(image id 2\): not enough memory for "
                                             r"its 10x12 \(w x h\) pixels"):
        decode_image(str(tmp_path / "big.png"), 2)


# ---------------------------------------------------------------------------------------------------
# A resize that would leave a side of 0 pixels


@pytest.fixture
def strip_set(tmp_path):
    """A 'val' and 'train' file with a normal image (id 1) and a 1 x 2000 strip (id 4): data.scale (64, 48)
    makes the strip 64 x 0 (s = min(64 / 2000, 48 / 1), height int(1 * 0.032 + 0.5) = 0)."""
    data = coco_dict([image_entry(1, 30, 40), image_entry(4, 1, 2000, "strip.png")],
                     [ann_entry(1, 1, [1, 1, 5, 5]), ann_entry(2, 4, [10, 0, 20, 1])])
    write_dataset(tmp_path, data, fmt="PNG")
    cfg = tiny_data_config(root=str(tmp_path), train_ann="ann.json", train_images="images", val_ann="ann.json",
                           val_images="images", min_size=0)
    return cfg, data


MESSAGE = (r"ann\.json: image id 4 \(.*strip\.png\) is 2000x1 \(w x h\): data\.scale=\(64, 48\) with "
           r"data\.resize_mode='mmdet' resizes it to 64x0, and an image with a side of 0 pixels cannot be run")


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_image_resized_to_a_zero_side_stops_the_run_at_the_start(strip_set, split):
    # F.interpolate refuses an output size of 0 with a RuntimeError that names no file: refused before.
    cfg, _ = strip_set
    with pytest.raises(ResizeError, match=MESSAGE) as err:
        coco.load_split(cfg, split)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    cfg.resize_mode = "torchvision"  # floors: int(1 * 0.032) = 0
    with pytest.raises(ResizeError, match=r"image id 4 .* resizes it to 64x0"):
        coco.load_split(cfg, split)


def test_the_dataset_refuses_it_when_built(strip_set):
    cfg, _ = strip_set
    coco_set = coco.load_coco(os.path.join(cfg.root, "ann.json"), os.path.join(cfg.root, "images"))
    with pytest.raises(ResizeError, match=MESSAGE):
        DetectionDataset(coco_set, transforms.TransformConfig.from_config(cfg), train=False)


def test_prediction_names_the_image_it_cannot_resize(strip_set, tmp_path):
    cfg, _ = strip_set
    transform_cfg = transforms.TransformConfig.from_config(cfg)
    strip = np.zeros((1, 2000, 3), np.uint8)
    for canvas in ("fixed", "tight"):
        with pytest.raises(ResizeError, match=r"^image 3 of the list is 2000x1 \(w x h\): .* resizes it to 64x0"):
            transforms.preprocess_for_inference(strip, transform_cfg, canvas, what="image 3 of the list")
    model_cfg = predict_config()
    _, ckpt = labelled_checkpoint(tmp_path, model_cfg)
    paths = [os.path.join(cfg.root, "images", name) for name in ("000001.jpg", "strip.png")]
    # data.scale (96, 64): s = min(96 / 2000, 64 / 1) = 0.048, height int(0.048 + 0.5) = 0.
    predictor = Predictor(ckpt, device="cpu")
    with pytest.raises(ResizeError, match=rf"^{re.escape(paths[1])} is 2000x1 \(w x h\): data\.scale=\(96, 64\) .* "
                                          r"resizes it to 96x0"):
        predict.predict_files(predictor, paths)
