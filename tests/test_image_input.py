"""retina_fn/data/image_input.py: numpy, torch and PIL images in memory as the uint8 RGB pixels the transforms take."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fn.data.image_input import as_rgb_uint8
from retina_fn.data.images import decode_image


@pytest.fixture(scope="module")
def rgba():
    """uint8 [5, 7, 4]: RGB plus a random alpha channel."""
    return np.random.default_rng(0).integers(0, 256, size=(5, 7, 4), dtype=np.uint8)


def test_uint8_rgb_is_taken_as_it_is_in_either_layout(rgba):
    rgb = np.ascontiguousarray(rgba[:, :, :3])
    np.testing.assert_array_equal(as_rgb_uint8(rgb), rgb)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)  # a non-contiguous view, as permute gives
    out = as_rgb_uint8(chw)
    np.testing.assert_array_equal(out, rgb)
    assert out.dtype == np.uint8 and out.flags.c_contiguous


def test_a_read_only_array_is_copied_so_torch_reads_it_without_a_warning(rgba):
    rgb = np.ascontiguousarray(rgba[:, :, :3])
    frozen = np.asarray(Image.fromarray(rgb))  # PIL's array interface gives a read-only array
    assert not frozen.flags.writeable
    out = as_rgb_uint8(frozen)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on a read-only array
        torch.from_numpy(out)
    writable = rgb.copy()
    assert as_rgb_uint8(writable) is writable  # a writable contiguous array is taken as it is


def test_grey_is_replicated_and_alpha_dropped(rgba):
    grey = rgba[:, :, 0]
    by_hand = np.stack([grey, grey, grey], axis=-1)
    for image in (grey, grey[:, :, None], torch.from_numpy(grey), torch.from_numpy(grey)[None]):
        np.testing.assert_array_equal(as_rgb_uint8(image), by_hand)
    np.testing.assert_array_equal(as_rgb_uint8(rgba), rgba[:, :, :3])  # not composited with the alpha
    np.testing.assert_array_equal(as_rgb_uint8(torch.from_numpy(rgba).permute(2, 0, 1)), rgba[:, :, :3])


def test_floats_in_the_unit_interval_give_back_their_uint8_image(rgba):
    rgb = np.ascontiguousarray(rgba[:, :, :3])
    rgb[0, 0], rgb[0, 1] = 0, 255  # both ends
    unit = rgb.astype(np.float32) / 255  # what torchvision's to_tensor makes (here HWC)
    np.testing.assert_array_equal(as_rgb_uint8(unit), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(unit.astype(np.float64)), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(torch.from_numpy(unit).permute(2, 0, 1)), rgb)
    np.testing.assert_array_equal(as_rgb_uint8(np.array([[0.5, 0.501]])), [[[128] * 3, [128] * 3]])  # 127.5, 127.76


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16"])
def test_pil_images_convert_as_their_files_decode(rgba, mode, tmp_path):
    """The independent expectation is the file path: the same image saved as PNG and read by decode_image."""
    if mode == "I;16":
        image = Image.fromarray(rgba[:, :, 0].astype(np.uint16) * 257 + 3)  # 16-bit grey: high byte = the uint8
    else:
        image = Image.fromarray(rgba if "A" in mode else rgba[:, :, :3]).convert(mode)
    assert image.mode == mode
    image.save(tmp_path / "image.png")
    from_file = decode_image(str(tmp_path / "image.png"), image_id=0)
    np.testing.assert_array_equal(as_rgb_uint8(image), from_file)
    if mode in ("RGBA", "RGB"):
        np.testing.assert_array_equal(from_file, rgba[:, :, :3])
    if mode == "I;16":
        np.testing.assert_array_equal(from_file, np.repeat(rgba[:, :, :1], 3, axis=2))


@pytest.mark.parametrize("image, error, message", [
    (np.full((4, 6, 3), 200.0, np.float32), ValueError, r"float32 pixels in \[200, 200\].*round\(\).astype"),
    (np.full((4, 6, 3), np.nan, np.float32), ValueError, "NaN or infinite"),
    (np.full((4, 6, 3), 9, np.uint16), ValueError, r"uint16 pixels; expected uint8.*astype\(np.uint8\)"),
    (np.zeros((4, 6, 3), np.int64), ValueError, "int64 pixels"),
    (np.zeros((4, 6, 3), bool), ValueError, "bool pixels"),
    (np.zeros((3, 8, 9), np.uint8), ValueError, r"shape \(3, 8, 9\): expected HWC.*transpose\(1, 2, 0\)"),
    (np.zeros((8, 9, 2), np.uint8), ValueError, r"shape \(8, 9, 2\): expected one image"),
    (np.zeros((0, 9, 3), np.uint8), ValueError, "empty image"),
    (torch.zeros(8, 9, 3, dtype=torch.uint8), ValueError, r"shape \(8, 9, 3\): expected CHW.*permute\(2, 0, 1\)"),
    (torch.zeros(2, 3, 8, 9, dtype=torch.uint8), ValueError, r"\(2, 3, 8, 9\).*list\(tensor\)"),
    ("a.jpg", TypeError, r"got builtins.str; expected a numpy array.*PIL.Image.open"),
])
def test_other_inputs_are_refused_naming_the_image(image, error, message):
    with pytest.raises(error, match=message) as caught:
        as_rgb_uint8(image, "image 3 of the list")
    assert str(caught.value).startswith("image 3 of the list: ")
