"""Where ``extract`` writes each image's files, and which images a rerun may skip.

The output mirrors the input tree: an image at ``<root>/2024/IMG_0001.JPG``, where ``<root>`` is
the folder common to all inputs, gets ``<outdir>/2024/IMG_0001/``. A single folder of images thus
gives the original script's flat ``<outdir>/<image_stem>/``; ``flat=True`` (``--flat``) gives it
for any tree, refusing repeated names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

MANIFEST = "manifest.json"


def output_folders(paths: Sequence[Path], outdir: Path, flat: bool = False) -> list[Path]:
    """Each image's output folder, in input order: ``outdir`` / (its path relative to the inputs'
    common folder, without the suffix); with ``flat``, ``outdir`` / its stem.

    Linear in the number of images. Raises :class:`ValueError` naming every group of images that
    would share a folder (``a/x.png`` and ``a/x.jpg``).
    """
    if not paths:
        return []
    if flat:
        folders = [outdir / path.stem for path in paths]
    else:
        absolute = [Path(os.path.abspath(path)) for path in paths]  # normalises "..", keeps links
        root = Path(os.path.commonpath([path.parent for path in absolute]))
        folders = [outdir / path.relative_to(root).with_suffix("") for path in absolute]
    users: dict[Path, list[Path]] = {}
    for path, folder in zip(paths, folders, strict=True):
        users.setdefault(folder, []).append(path)
    clashes = [f"{folder}: {', '.join(map(str, group))}" for folder, group in users.items() if len(group) > 1]
    if clashes:
        raise ValueError(
            f"several images would write to the same folder (rename one of each, or drop --flat): {'; '.join(clashes)}"
        )
    return folders


def is_complete(folder: Path, outputs: Sequence[str]) -> bool:
    """True when ``folder`` holds a manifest (written last, so the save finished) that lists every
    name of ``outputs``, and every file it lists exists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return set(outputs) <= files.keys() and all((folder / entry["file"]).is_file() for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
