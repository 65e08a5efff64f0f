"""Bad inputs end in a clear error (naming the file, image id or field) or a counted skip, and nothing
already saved is lost: image kinds and EXIF orientation, empty, truncated and oversized images,
non-finite and duplicated annotation entries, checkpoints of another model, pickles that carry code and
checkpoint writes that fail. docs/reliability.md lists these tests by fault."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from retina_fn import checkpoint, rng, tree
from retina_fn.data import images as images_lib
from retina_fn.data.coco import CocoFormatError, load_coco
from retina_fn.data.images import ImageLoadError, apply_orientation, decode_image
from retina_fn.data.loader import make_train_loader
from retina_fn.data.transforms import TransformConfig, eval_transform
from retina_fn.interop import CheckpointMismatch, load_detector_weights
from retina_fn.interop.detector import template
from tests.coco_fixtures import ann_entry, coco_dict, image_entry, small_dataset, tiny_data_config, write_image
from tests.model_fixtures import tiny_config


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG file written by hand: IHDR, one IDAT of `rows` (each row prefixed by filter 0; None: no
    IDAT at all, a header only) and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header)
    if rows is not None:
        body += chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# ----------------------------------------------------------------------------------------------------
# 1. Image kinds: decoded as OpenCV's IMREAD_COLOR decodes them


def test_grey_and_bilevel_images_become_three_equal_channels(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], np.uint8), mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "l.png"), 1)[0], [[0] * 3, [77] * 3, [255] * 3])
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "b.png"), 2)[0], [[0] * 3, [255] * 3])


def test_16_bit_samples_keep_their_high_byte_as_libpng_strip_16(tmp_path):
    grey = np.array([[0, 255, 256, 1000, 40000, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")  # mode I;16, which Pillow's own conversion clips
    out = decode_image(str(tmp_path / "g16.png"), 1, (1, 6))
    assert out.dtype == np.uint8 and out.shape == (1, 6, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 3, 156, 255])
    assert (out == out[:, :, :1]).all()
    # a 16-bit RGB PNG (colour type 2): Pillow keeps the high byte itself
    rgb16 = struct.pack(">HHHHHH", 0x1234, 0xABCD, 0x00FF, 0xFFFF, 0x8000, 0x0100)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(2, 1, 16, 2, b"\x00" + rgb16))
    np.testing.assert_array_equal(decode_image(str(tmp_path / "rgb16.png"), 2), [[[0x12, 0xAB, 0x00],
                                                                                 [0xFF, 0x80, 0x01]]])


def test_cmyk_jpeg_uses_opencvs_formula(tmp_path):
    Image.new("CMYK", (8, 8), (10, 200, 30, 40)).save(tmp_path / "c.jpg", quality=100)
    out = decode_image(str(tmp_path / "c.jpg"), 1, (8, 8))
    # The file stores the inverted samples (Adobe): c, m, y, k = 245, 55, 225, 215; OpenCV gives
    # k - ((255 - s) * k >> 8) per channel: 215 - 8, 215 - 167, 215 - 25 (Pillow's formula: 207, 46, 190).
    assert (out == np.array([207, 48, 190], np.uint8)).all()


def test_alpha_is_dropped_not_composited(tmp_path):
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (3, 2), (90, 0)).save(tmp_path / "la.png")
    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=1)  # colour 1 fully transparent
    assert (decode_image(str(tmp_path / "rgba.png"), 1) == [10, 20, 30]).all()
    assert (decode_image(str(tmp_path / "la.png"), 2) == 90).all()
    assert (decode_image(str(tmp_path / "p.png"), 3) == [200, 100, 50]).all()


# ----------------------------------------------------------------------------------------------------
# 2. EXIF orientation: applied, and a quarter turn against the stored size is an error


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_the_exif_table_says(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    path = tmp_path / f"o{orientation}.png"  # lossless, so Pillow's own exif_transpose is an exact reference
    Image.fromarray(stored).save(path, exif=exif_with_orientation(orientation))
    expected = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    out = decode_image(str(path), 1, expected.shape[:2])
    np.testing.assert_array_equal(out, expected)
    assert out.flags.c_contiguous and out.flags.writeable
    assert out.shape[:2] == ((5, 3) if orientation >= 5 else (3, 5))
    np.testing.assert_array_equal(apply_orientation(stored, orientation), expected)


def test_quarter_turn_against_the_stored_size_is_a_clear_error(tmp_path):
    path = tmp_path / "phone.jpg"
    write_image(path, 24, 40)  # stored 40 wide, 24 high
    Image.open(path).save(path, exif=exif_with_orientation(6))
    assert decode_image(str(path), 5, (40, 24)).shape == (40, 24, 3)  # the annotation file saw it turned
    with pytest.raises(ImageLoadError) as err:
        decode_image(str(path), 5, (24, 40))  # the annotation file saw the stored pixels
    text = str(err.value)
    assert "phone.jpg (image id 5) decodes to 24x40 (w x h) but the annotation file says 40x24" in text
    assert "EXIF orientation 6 (rotated 90 degrees clockwise)" in text
    assert "stored 40x24 pixels" in text and "remove the orientation tag" in text


# ----------------------------------------------------------------------------------------------------
# 3. Empty and truncated files; 4. images over the pixel limit


def test_an_empty_file_names_the_file_and_image_id(tmp_path):
    """(A truncated file: tests/test_data_images.py::test_missing_corrupt_and_wrong_size_images.)"""
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg \(image id 3\): the file is empty \(0 bytes\)"):
        decode_image(str(tmp_path / "empty.jpg"), 3)


def test_unreadable_images_are_replaced_and_counted_with_skip_bad_images(tmp_path):
    """An empty file, a truncated JPEG and a turned one, all landscape: each is replaced by the one
    readable landscape image and counted; without data.skip_bad_images the first is an error."""
    sizes = [(30, 40), (24, 40), (30, 45), (20, 32), (40, 30), (32, 20)]
    coco = load_coco(*small_dataset(tmp_path, sizes, boxes_per_image=1))
    empty, cut, turned = coco.records[1:4]
    open(empty.path, "wb").close()
    data = open(cut.path, "rb").read()
    open(cut.path, "wb").write(data[: len(data) // 2])
    Image.open(turned.path).save(turned.path, exif=exif_with_orientation(8))
    key = rng.key(3)
    loader = make_train_loader(tiny_data_config(skip_bad_images=True), coco, rank=0, world_size=1, key=key)
    loader.set_epoch(0)
    batches = list(loader)
    assert loader.totals["images_replaced"] == 3
    used = [int(b["index"][i]) for b in batches for i in range(b["index"].shape[0]) if b["replaced"][i]]
    assert used == [0, 0, 0]  # the readable landscape image stands in each time
    strict = make_train_loader(tiny_data_config(), coco, rank=0, world_size=1, key=key)
    strict.set_epoch(0)
    with pytest.raises(ImageLoadError, match=r"\(image id [234]\)"):
        list(strict)


def test_a_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(20_000, 20_000, 8, 2, rows=None))  # 400 M pixels claimed, ~60 bytes on disk
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match=r"bomb\.png \(image id 9\)"):
        decode_image(str(path), 9)  # refused by Pillow's own check or ours, whichever comes first
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # the process-wide setting is left alone
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # other code switched Pillow's check off
    with pytest.raises(ImageLoadError, match=r"is 20000x20000 \(w x h\) = 400000000 pixels, over the limit of "
                                             r"178956970 \(retina_fn\.data\.images\.MAX_IMAGE_PIXELS\)"):
        decode_image(str(path), 9)


def test_the_pixel_limit_is_a_module_constant(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", 20, 20)
    monkeypatch.setattr(images_lib, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(ImageLoadError, match="400 pixels, over the limit of 399"):
        decode_image(str(tmp_path / "a.png"), 1)
    monkeypatch.setattr(images_lib, "MAX_IMAGE_PIXELS", 400)
    assert decode_image(str(tmp_path / "a.png"), 1).shape == (20, 20, 3)


# ----------------------------------------------------------------------------------------------------
# 5. Annotation files


def write_raw_json(path, data) -> str:
    with open(path, "w") as f:
        json.dump(data, f, allow_nan=True)  # writes NaN / Infinity, which Python's json reads back
    return str(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_box_or_area_names_the_annotation(tmp_path, bad):
    images = [image_entry(1, 10, 10)]
    boxes = coco_dict(images, [ann_entry(7, 1, [1, 1, 2, 2]), dict(ann_entry(8, 1, [1, 1, 2, 2]), bbox=[1, bad, 2, 2])])
    with pytest.raises(CocoFormatError, match=r"ann\.json: annotation id 8 \(image id 1\): 'bbox' must be 4 finite"):
        load_coco(write_raw_json(tmp_path / "ann.json", boxes), str(tmp_path))
    areas = coco_dict(images, [dict(ann_entry(4, 1, [1, 1, 2, 2]), area=bad)])
    with pytest.raises(CocoFormatError, match=r"annotation id 4 \(image id 1\): 'area' must be a finite number"):
        load_coco(write_raw_json(tmp_path / "ann.json", areas), str(tmp_path))
    sizes = coco_dict([dict(image_entry(1, 10, 10), width=bad)], [])
    with pytest.raises(CocoFormatError, match=r"image id 1: 'width' must be an integer"):
        load_coco(write_raw_json(tmp_path / "ann.json", sizes), str(tmp_path))


def test_duplicate_annotation_ids_are_an_error(tmp_path):
    # duplicate image ids: tests/test_data_coco.py::test_missing_keys_name_the_entry
    images = [image_entry(1, 10, 10), image_entry(2, 10, 10)]
    anns = [ann_entry(5, 1, [1, 1, 2, 2]), ann_entry(6, 1, [1, 1, 2, 2]), ann_entry(5, 2, [0, 0, 3, 3])]
    data = coco_dict(images, anns)
    with pytest.raises(CocoFormatError, match=r"ann\.json: annotation id 5 appears twice in 'annotations' "
                                              r"\(at positions 0 and 2\)"):
        load_coco(write_raw_json(tmp_path / "ann.json", data), str(tmp_path))


def test_negative_box_origins_are_kept_and_clipped_by_the_resize(tmp_path):
    data = coco_dict([image_entry(1, 30, 40)], [ann_entry(1, 1, [-5, -3, 15, 13])])
    coco = load_coco(write_raw_json(tmp_path / "ann.json", data), str(tmp_path))
    np.testing.assert_array_equal(coco.records[0].boxes, [[-5, -3, 10, 10]])  # as mmdetection parses it
    out = eval_transform(np.zeros((30, 40, 3), np.uint8), coco.records[0].boxes, np.zeros((0, 4), np.float32),
                         TransformConfig.from_config(tiny_data_config()))
    scale = 64 / 40  # the 40-wide image resized to the 64-wide canvas
    np.testing.assert_allclose(out["boxes"], [[0, 0, 10 * scale, 10 * scale]], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 6. A checkpoint of another model config; 7. pickles that carry code


def save_run(directory, model_cfg) -> str:
    """checkpoint.save of a train state holding zero parameters shaped for model_cfg."""
    params = tree.map(lambda leaf: torch.zeros(tuple(leaf.shape)), template(model_cfg))
    return checkpoint.save(str(directory), 1, {"params": params, "step": torch.tensor(1)})


def narrow_config(depth: int, num_classes: int = 3):
    cfg = tiny_config(num_classes=num_classes)
    cfg.model.backbone.depth = depth
    cfg.model.backbone.base_width = 8
    return cfg


def test_a_checkpoint_of_another_depth_gets_one_report(tmp_path):
    """ResNet-18's keys are a subset of ResNet-50's: 18 -> 50 has missing and mis-shaped keys, 50 -> 18
    unexpected and mis-shaped ones; each is one report that lists them all."""
    r18 = save_run(tmp_path / "r18", narrow_config(18).model)
    with pytest.raises(CheckpointMismatch) as err:
        load_detector_weights(r18, narrow_config(50).model)
    text = str(err.value)
    assert text.startswith(f"{r18} does not match the model:")
    assert "165 missing:" in text and "backbone/layer1/0/conv3/weight" in text
    assert "mis-shaped:" in text and "fpn/lateral/0/weight: checkpoint (32, 16, 1, 1) vs model (32, 64, 1, 1)" in text
    r50 = save_run(tmp_path / "r50", narrow_config(50).model)
    with pytest.raises(CheckpointMismatch) as err:
        load_detector_weights(r50, narrow_config(18).model)
    text = str(err.value)
    assert text.startswith(f"{r50} does not match the model:")
    assert "165 unexpected:" in text and "backbone/layer1/0/conv3/weight" in text and "27 mis-shaped:" in text


def test_a_checkpoint_with_another_class_count_names_the_fix(tmp_path):
    path = save_run(tmp_path / "k3", narrow_config(18, num_classes=3).model)
    with pytest.raises(CheckpointMismatch, match=r"3 classes x 9 anchors.*--config\.model\.num_classes=3"):
        load_detector_weights(path, narrow_config(18, num_classes=5).model)


class OpensAFile:
    """Unpickling this calls open(marker, 'w'), which creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


class Plain:
    """A class of this module: unpickling it needs an import, which weights-only loading refuses."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes protocol 4 before refusing
def test_a_weights_file_carrying_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": OpensAFile(str(marker))}, path)
    with pytest.raises(CheckpointMismatch, match=r"evil\.pth: refused by weights-only loading: it names the "
                                                 r"Python object io\.open, which could run code"):
        load_detector_weights(path, narrow_config(18).model)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": Plain()}, f, protocol=2)
    with pytest.raises(CheckpointMismatch, match=r"plain\.pkl: refused .* names the Python object "
                                                 r"tests\.test_bad_inputs\.Plain"):
        load_detector_weights(tmp_path / "plain.pkl", narrow_config(18).model)
    with open(tmp_path / "plain4.pkl", "wb") as f:
        pickle.dump({"w": Plain()}, f, protocol=4)
    with pytest.raises(CheckpointMismatch, match=r"plain4\.pkl: refused by weights-only loading"):
        load_detector_weights(tmp_path / "plain4.pkl", narrow_config(18).model)
    assert not marker.exists()


def test_a_checkpoint_carrying_code_is_skipped_for_the_previous_one(tmp_path, caplog):
    marker = tmp_path / "ran"
    checkpoint.save(str(tmp_path), 1, make_state(1))
    torch.save({"format": checkpoint.FORMAT, "step": 2, "state": {}, "meta": OpensAFile(str(marker))},
               checkpoint.path_for(str(tmp_path), 2))
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"ckpt_000000002\.pt: refused by weights-only"):
        checkpoint.load(checkpoint.path_for(str(tmp_path), 2))
    assert checkpoint.restore_latest(str(tmp_path)).step == 1
    assert "ckpt_000000002.pt: refused" in caplog.text
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# 8. Checkpoint writes that fail: a full disk, a read-only file system


def make_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"params": {"w": torch.randn(64, 64, generator=g)}, "step": torch.tensor(step)}


def _raise(code: int):
    def fail(*args):
        raise OSError(code, os.strerror(code))
    return fail


class HalfWriter:
    """A file whose write puts half the bytes on disk, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        _raise(errno.ENOSPC)()


def _fail_open(m, name_part: str, half_way: bool):
    """The checkpoint module's open() of files whose name holds `name_part` fails with ENOSPC: at once, or
    half way through the write."""
    real_open = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        if name_part not in str(path):
            return real_open(path, mode, *args, **kwargs)
        if not half_way:
            _raise(errno.ENOSPC)()
        return HalfWriter(real_open(path, mode, *args, **kwargs))

    m.setattr(checkpoint, "open", fake_open, raising=False)


FAILURES = {
    "write": lambda m: _fail_open(m, ".pt.tmp.", half_way=True),
    "fsync": lambda m: m.setattr(checkpoint.os, "fsync", _raise(errno.ENOSPC)),  # delayed-allocation errors
    "rename": lambda m: m.setattr(checkpoint.os, "replace", _raise(errno.EROFS)),
    "digest": lambda m: _fail_open(m, ".sha256.tmp.", half_way=False),  # the data file is in place by then
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_save_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    directory = str(tmp_path)
    checkpoint.save(directory, 1, make_state(1))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(directory)}
    with monkeypatch.context() as m:
        FAILURES[failure](m)
        with pytest.raises(OSError) as err:
            checkpoint.save(directory, 2, make_state(2), keep=1)  # keep=1: step 1 would be pruned on success
    assert err.value.errno in (errno.ENOSPC, errno.EROFS)
    assert "cannot write" in str(err.value) and "ckpt_000000002" in str(err.value)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(directory)}
    assert after == before  # no temporary file, no half checkpoint, step 1 untouched
    restored = checkpoint.restore_latest(directory)
    assert restored.step == 1 and tree.all_equal(restored.state, make_state(1))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_fails_loudly(tmp_path):
    checkpoint.save(str(tmp_path), 1, make_state(1))
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(OSError, match="ckpt_000000002"):
            checkpoint.save(str(tmp_path), 2, make_state(2))
    finally:
        os.chmod(tmp_path, 0o755)
    assert checkpoint.restore_latest(str(tmp_path)).step == 1
