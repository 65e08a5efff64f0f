"""retina_fn/data/images.py: decoding image files."""

import numpy as np
import pytest
from PIL import Image

from retina_fn.data import coco
from retina_fn.data.images import ImageLoadError, decode_image
from tests.coco_fixtures import write_image


def test_decode_lossless_image_exactly(tmp_path):
    pixels = write_image(tmp_path / "x.png", 7, 9, seed=3)
    out = decode_image(str(tmp_path / "x.png"), 1, (7, 9))
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, pixels)


def test_grey_image_becomes_rgb(tmp_path):
    Image.fromarray(np.full((4, 5), 77, np.uint8), mode="L").save(tmp_path / "g.png")
    out = decode_image(str(tmp_path / "g.png"), 1)
    assert out.shape == (4, 5, 3) and (out == 77).all()


def test_missing_corrupt_and_wrong_size_images(tmp_path):
    with pytest.raises(ImageLoadError, match=r"not found: .*gone\.jpg \(image id 5\)"):
        decode_image(str(tmp_path / "gone.jpg"), 5)
    write_image(tmp_path / "ok.jpg", 40, 30)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*cut\.jpg \(image id 6\)"):
        decode_image(str(tmp_path / "cut.jpg"), 6)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"junk\.jpg \(image id 7\)"):
        decode_image(str(tmp_path / "junk.jpg"), 7)
    with pytest.raises(ImageLoadError, match=r"decodes to 30x40 .* says 40x30"):
        decode_image(str(tmp_path / "ok.jpg"), 8, (30, 40))


def test_old_names_still_importable_from_coco():
    assert coco.decode_image is decode_image and coco.ImageLoadError is ImageLoadError
