"""The SDK's image inputs: every accepted kind becomes PNG or file bytes the server decodes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen25vl_embed.images import to_image_message


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA", "CMYK", "YCbCr", "F"])
def test_every_pil_mode_is_sent_as_a_png(mode: str) -> None:
    image = Image.new(mode, (5, 3))
    message = to_image_message(image)
    assert message.mime_type == "image/png"
    with Image.open(io.BytesIO(message.data)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.size == (5, 3)


def test_mode_i_keeps_16_bit_values() -> None:
    pixels = np.array([[0, 255, 65535, 70000]], dtype=np.int32)
    with Image.open(io.BytesIO(to_image_message(Image.fromarray(pixels, mode="I")).data)) as decoded:
        assert np.asarray(decoded).astype(np.int64).tolist() == [[0, 255, 65535, 65535]]


def test_arrays_paths_and_bytes(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(to_image_message(array).data)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded), array)
    path = tmp_path / "photo.jpg"
    Image.fromarray(array).save(path)
    message = to_image_message(path)
    assert message.data == path.read_bytes()
    assert message.mime_type == "image/jpeg"
    with pytest.raises(ValueError, match=r"must have shape \[H, W, 3\]"):
        to_image_message(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(TypeError):
        to_image_message(3.5)  # type: ignore[arg-type]
