"""Image loading: modes, bit depths, arrays, files, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm_fo1.images import fit_for_encoders, load_image


def test_rgb_passes_through_unchanged():
    image = Image.new("RGB", (5, 4), (10, 20, 30))
    assert load_image(image) is image


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = load_image(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("value, expected", [(0, 0), (65535, 255), (32896, 128)])
def test_16_bit_is_scaled_not_clipped(value, expected):
    image = Image.fromarray(np.full((3, 3), value, dtype=np.uint16))
    assert load_image(image).getpixel((1, 1)) == (expected, expected, expected)


def test_16_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 6), 51400, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (200, 200, 200)


def test_float_arrays():
    assert load_image(np.full((2, 2, 3), 0.5, dtype=np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.full((2, 2), 300.0)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((2, 2), np.nan))


def test_grayscale_palette_bilevel_cmyk():
    for image in (
        Image.new("L", (3, 3), 7),
        Image.new("P", (3, 3)),
        Image.new("1", (3, 3), 1),
        Image.new("CMYK", (3, 3)),
    ):
        assert load_image(image).mode == "RGB"


def test_bad_inputs():
    with pytest.raises(ValueError, match="cannot read image"):
        load_image("/nonexistent/file.png")
    with pytest.raises(ValueError, match="expected an image path, PIL image or numpy array, got list"):
        load_image([[1, 2]])
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="aspect ratio of at most 200"):
        load_image(Image.new("RGB", (1000, 2)))


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(path)


def test_fit_for_encoders():
    assert fit_for_encoders(Image.new("RGB", (1, 1))).size == (28, 28)
    assert fit_for_encoders(Image.new("RGB", (4096, 1024))).size == (2048, 512)
    assert fit_for_encoders(Image.new("RGB", (10, 40))).size == (28, 112)
    same = Image.new("RGB", (300, 200))
    assert fit_for_encoders(same) is same
