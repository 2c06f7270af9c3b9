"""The on-disk format of a result: one ``<name>.npy`` per output plus a ``manifest.json``.

:func:`save` is what :meth:`Embeddings.save <qwen25vl_embed.embeddings.Embeddings.save>` does,
where the layout and the manifest are described. Every file is written atomically (a temporary
name, then a rename), the manifest last.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from qwen25vl_embed.embeddings import Embeddings

__all__ = ["MANIFEST_FORMAT_VERSION", "save"]

MANIFEST_FORMAT_VERSION = 1

# Tensor names become file names: no separators, no leading dot.
_FILE_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MANIFEST_KEYS = frozenset(
    {"format_version", "request_id", "sequence_length", "visual_token_lens", "image_grid_thw", "files"}
)


def save(result: Embeddings, outdir: str | os.PathLike[str], extra_manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``result`` to ``outdir``: what :meth:`Embeddings.save
    <qwen25vl_embed.embeddings.Embeddings.save>` does (its docstring has the layout, return value
    and errors)."""
    extra = dict(extra_manifest or {})
    clash = sorted(_MANIFEST_KEYS & extra.keys())
    if clash:
        raise ValueError(f"extra_manifest may not set the manifest's own keys: {clash}")
    arrays = dict(result.tensors)
    arrays.setdefault("visual_token_lens", result.visual_token_lens)
    arrays.setdefault("image_grid_thw", result.image_grid_thw)
    files: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        if not _FILE_SAFE_NAME.fullmatch(name):
            raise ValueError(f"output name {name!r} cannot be used as a file name")
        # numpy's dtype names equal the wire names for every wire dtype.
        entry: dict[str, Any] = {
            "file": f"{name}.npy",
            "shape": list(array.shape),
            "dtype": array.dtype.name,
        }
        if array.dtype == ml_dtypes.bfloat16:
            entry["saved_dtype"] = "float32"
        files[name] = entry
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "request_id": result.request_id,
        "sequence_length": result.sequence_length,
        "visual_token_lens": result.visual_token_lens.tolist(),
        "image_grid_thw": result.image_grid_thw.tolist(),
        "files": files,
        **extra,
    }
    # Serialised before anything is written, so that a bad extra_manifest writes nothing.
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        saved = array.astype(np.float32) if "saved_dtype" in files[name] else array
        _save_npy(out / files[name]["file"], saved)
    _write_atomic(out / "manifest.json", lambda f: f.write(text.encode()))
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
