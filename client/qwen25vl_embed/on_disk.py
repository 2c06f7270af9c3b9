"""The on-disk format of a result: one ``<name>.npy`` per output plus a ``manifest.json``.

:func:`save` is what :meth:`Embeddings.save <qwen25vl_embed.embeddings.Embeddings.save>` does,
where the layout and the manifest are described. Every file is written atomically (a temporary
name, then a rename), the manifest last, with the permissions the umask gives new files (as
``open`` does). A save into a folder that holds an earlier result removes the ``.npy`` files that
the earlier manifest listed and the new one does not, so the folder never holds stale outputs.
"""

from __future__ import annotations

import json
import os
import re
import uuid
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


def save(
    result: Embeddings,
    outdir: str | os.PathLike[str],
    extra_manifest: Mapping[str, Any] | None = None,
    described: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``result`` to ``outdir``: what :meth:`Embeddings.save
    <qwen25vl_embed.embeddings.Embeddings.save>` does (its docstring has the layout, return value
    and errors). ``described``: the image, prompt and model keys, None values left out."""
    extra = dict(extra_manifest or {})
    clash = sorted(_MANIFEST_KEYS & extra.keys())
    if clash:
        raise ValueError(f"extra_manifest may not set the manifest's own keys: {clash}")
    for key, value in (described or {}).items():
        if value is None:
            continue
        if key in extra:
            raise ValueError(f"{key!r} is given both as an argument and in extra_manifest")
        extra[key] = value
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
    earlier = _listed_files(out / "manifest.json")
    for name, array in arrays.items():
        saved = array.astype(np.float32) if "saved_dtype" in files[name] else array
        _save_npy(out / files[name]["file"], saved)
    _write_atomic(out / "manifest.json", lambda f: f.write(text.encode()))
    for stale in earlier - {entry["file"] for entry in files.values()}:
        (out / stale).unlink(missing_ok=True)
    return out


def _listed_files(manifest: Path) -> set[str]:
    """The ``.npy`` files an earlier manifest lists (none if there is no readable one). Only file
    names this module writes count, so that a foreign manifest cannot delete anything else."""
    try:
        files = json.loads(manifest.read_text())["files"]
        names = {entry["file"] for entry in files.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {
        name for name in names if isinstance(name, str) and name.endswith(".npy") and _FILE_SAFE_NAME.fullmatch(name)
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    # Not tempfile.mkstemp: it creates 0600 files whatever the umask, which makes shared output
    # folders unreadable to the group. O_EXCL with a unique name is as safe.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
