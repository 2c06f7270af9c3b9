"""The image formats the server decodes, and the file suffixes that name them.

Pillow only: the command line's client path (``extract --server``), which runs without the
server extra, finds a folder's images by these suffixes; the decoding itself is in
:mod:`~qwen25vl_embed_server.core.model.image_decoding`.
"""

from __future__ import annotations

from PIL import Image

_WANTED_FORMATS = (
    "PNG",  # APNG too
    "JPEG",  # MPO (multi-picture JPEG from many phone cameras) too
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "AVIF",  # Pillow >= 11.3
    "JPEG2000",
    "PPM",
)
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)
"""Pillow format names that :func:`~qwen25vl_embed_server.core.model.image_decoding.decode_image` opens
(those of the list this Pillow has)."""

# MPO (multi-picture JPEG) opens through the JPEG plugin, which does not register its suffix.
_EXTRA_SUFFIXES = {"JPEG": (".mpo",)}
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {suffix for suffix, name in Image.registered_extensions().items() if name in ALLOWED_FORMATS}
    | {suffix for name in ALLOWED_FORMATS for suffix in _EXTRA_SUFFIXES.get(name, ())}
)
"""File suffixes (lower case, with the dot) of the allowed formats: what a folder of images is
searched for, by ``extract`` and ``bulk`` alike."""
