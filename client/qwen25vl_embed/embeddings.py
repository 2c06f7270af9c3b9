"""The typed result of one Extract call: :class:`Embeddings` (and its :class:`Timings`).

A value: its outputs by name, with accessors and :meth:`Embeddings.split_by_image`. Building one
from a response stream lives in :mod:`qwen25vl_embed.assembly`, writing one to disk in
:mod:`qwen25vl_embed.on_disk`; the methods here that do those delegate to them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from qwen25vl_embed import on_disk
from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["Embeddings", "Timings", "retrieval_vectors"]

RETRIEVAL_OUTPUTS = ("multi_vector", "single_vector")

# Per-image token tensors and the count that splits them: vision patches or image tokens.
_PATCH_ROWS = re.compile(r"vision_tokens|vision_layer_-?\d+")
_TOKEN_ROWS = frozenset({"projected_tokens", "lm_image_tokens"})
# Metadata outputs with one row per image.
_IMAGE_ROWS = frozenset({"visual_token_lens", "image_grid_thw"})


@dataclass(frozen=True)
class Timings:
    """Where the server spent one request's time before its outputs were ready, in milliseconds.

    Measured on the server and sent before the tensors, so serialising and sending the response
    are in none of them. ``queue_ms + preprocess_ms + model_ms <= total_ms``.

    Attributes:
        queue_ms: waiting in the batching queue for the model run of its batch.
        preprocess_ms: decoding the images and the processor (resize, patches, tokenization).
        model_ms: the model run of its batch, shared by the ``batch_size`` requests in it.
        total_ms: from when the server started on the request until its outputs were ready.
        batch_size: requests in that batch (1: it ran alone).
    """

    queue_ms: float
    preprocess_ms: float
    model_ms: float
    total_ms: float
    batch_size: int

    @classmethod
    def from_proto(cls, message: pb.Timings) -> Timings:
        """The ``Timings`` of a ``Timings`` message."""
        return cls(
            queue_ms=message.queue_ms,
            preprocess_ms=message.preprocess_ms,
            model_ms=message.model_ms,
            total_ms=message.total_ms,
            batch_size=message.batch_size,
        )


@dataclass(frozen=True, eq=False, repr=False)
class Embeddings:
    """The outputs of one request, by name, with how the images entered the model.

    Notation as in the proto: Np patches and Nv image tokens over all images, Cv the vision hidden
    size, D the LM hidden size, T the sequence length. Token tensors hold every image of the
    request, concatenated along the first axis in request order; :meth:`split_by_image` separates
    them. Arrays are read-only; floating outputs have the dtype requested (``ml_dtypes.bfloat16``
    for bfloat16), integer ones int64.

    Attributes:
        tensors: every output received, name -> array, in arrival order (read-only mapping).
        visual_token_lens: int64 ``[num_images]``, image tokens per image (sums to Nv).
        image_grid_thw: int64 ``[num_images, 3]``, the (t, h, w) patch grid of each image.
        image_token_positions: int64 ``[Nv]``, ascending positions of the image tokens in the
            LM input sequence.
        sequence_length: T, the length of the LM input sequence.
        request_id: the request's id, as echoed by the server.
        timings: where the server spent the request's time; None when the server sent none
            (e.g. results built locally). Not written by :meth:`save`.
    """

    tensors: Mapping[str, np.ndarray]
    visual_token_lens: npt.NDArray[np.int64]
    image_grid_thw: npt.NDArray[np.int64]
    image_token_positions: npt.NDArray[np.int64]
    sequence_length: int
    request_id: str = ""
    timings: Timings | None = None

    def __post_init__(self) -> None:
        lens = _int_array(self.visual_token_lens, "visual_token_lens")
        grid = _int_array(self.image_grid_thw, "image_grid_thw")
        if grid.size == 0:
            grid = grid.reshape(0, 3)
        if lens.ndim != 1 or grid.ndim != 2 or grid.shape[1] != 3 or len(grid) != len(lens):
            raise ValueError(
                "visual_token_lens must have shape [num_images] and image_grid_thw [num_images, 3]; "
                f"got {list(lens.shape)} and {list(grid.shape)}"
            )
        positions = _int_array(self.image_token_positions, "image_token_positions")
        if positions.ndim != 1:
            raise ValueError(f"image_token_positions must be 1-d, got shape {list(positions.shape)}")
        tensors = {str(name): _read_only(np.asarray(array)) for name, array in self.tensors.items()}
        # Bypasses the frozen __setattr__ once, to store the normalised, read-only values.
        object.__setattr__(self, "tensors", MappingProxyType(tensors))
        object.__setattr__(self, "visual_token_lens", _read_only(lens))
        object.__setattr__(self, "image_grid_thw", _read_only(grid))
        object.__setattr__(self, "image_token_positions", _read_only(positions))
        object.__setattr__(self, "sequence_length", int(self.sequence_length))

    @classmethod
    def from_response_stream(cls, responses: Iterable[pb.EmbeddingResponse]) -> Embeddings:
        """The result carried by the responses of one Extract stream, in stream order.

        Raises:
            qwen25vl_embed.codec.CodecError: the stream is empty, lacks metadata on its first
                response, or holds an incomplete or inconsistent tensor.
        """
        from qwen25vl_embed.assembly import from_response_stream  # assembly imports this module

        return from_response_stream(responses)

    # --- access by name ------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """The output names present, in arrival order."""
        return tuple(self.tensors)

    @property
    def num_images(self) -> int:
        """Number of images in the request."""
        return len(self.visual_token_lens)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            available = ", ".join(self.tensors) or "none"
            raise KeyError(f"no output {name!r} in this result; available: {available}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        """Iterates over the output names, like a mapping."""
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {list(a.shape)} {a.dtype.name}" for name, a in self.tensors.items())
        return (
            f"Embeddings(request_id={self.request_id!r}, num_images={self.num_images}, "
            f"sequence_length={self.sequence_length}, tensors={{{shapes}}})"
        )

    @property
    def vision_tokens(self) -> np.ndarray | None:
        """``[Np, Cv]`` output of the last vision block, before the projector; None if not sent."""
        return self.tensors.get("vision_tokens")

    @property
    def projected_tokens(self) -> np.ndarray | None:
        """``[Nv, D]`` projector (PatchMerger) output; None if not sent."""
        return self.tensors.get("projected_tokens")

    @property
    def lm_last_hidden(self) -> np.ndarray | None:
        """``[1, T, D]`` LM last hidden states after the final norm; None if not sent."""
        return self.tensors.get("lm_last_hidden")

    @property
    def lm_image_tokens(self) -> np.ndarray | None:
        """``[Nv, D]`` rows of lm_last_hidden at the image-token positions; None if not sent."""
        return self.tensors.get("lm_image_tokens")

    @property
    def vision_pooled_mean(self) -> np.ndarray | None:
        """``[1, Cv]`` mean of vision_tokens over all patches; None if not sent."""
        return self.tensors.get("vision_pooled_mean")

    @property
    def projected_pooled_mean(self) -> np.ndarray | None:
        """``[1, D]`` mean of projected_tokens over all image tokens; None if not sent."""
        return self.tensors.get("projected_pooled_mean")

    @property
    def lm_pooled_mean(self) -> np.ndarray | None:
        """``[1, D]`` mean of lm_last_hidden over all T positions; None if not sent."""
        return self.tensors.get("lm_pooled_mean")

    @property
    def lm_image_pooled_mean(self) -> np.ndarray | None:
        """``[1, D]`` mean of lm_image_tokens; None if not sent."""
        return self.tensors.get("lm_image_pooled_mean")

    @property
    def lm_last_token(self) -> np.ndarray | None:
        """``[1, D]`` lm_last_hidden at the final position; None if not sent."""
        return self.tensors.get("lm_last_token")

    # --- per image -----------------------------------------------------------------------------

    def split_by_image(self, keep_shared: bool = False) -> list[Embeddings]:
        """One result per image, in request order, holding that image's rows of each token tensor.

        ``vision_tokens`` and ``vision_layer_<k>`` are split by patches (t*h*w of each grid),
        ``projected_tokens`` and ``lm_image_tokens`` by ``visual_token_lens``, and the
        ``visual_token_lens`` / ``image_grid_thw`` outputs, if present, by row. Outputs that mix
        all images (``lm_last_hidden``, ``lm_layer_<k>``, ``*_pooled_mean``, ``lm_last_token``)
        cannot be separated: they are left out of the parts (:attr:`shared_outputs` names them),
        or, with ``keep_shared=True``, carried whole into every part. Each part's metadata is its image's:
        one row of visual_token_lens and image_grid_thw, its slice of image_token_positions (still
        positions in the shared sequence), the shared sequence_length and timings. Parts are views.

        Raises:
            ValueError: a token tensor's first axis does not match the metadata.
        """
        n = self.num_images
        patch_bounds = _bounds(self.image_grid_thw.prod(axis=1))
        token_bounds = _bounds(self.visual_token_lens)
        image_bounds = list(range(n + 1))
        positions = self.image_token_positions
        if positions.size not in (0, token_bounds[-1]):
            raise ValueError(
                f"image_token_positions has {positions.size} entries but visual_token_lens sums to {token_bounds[-1]}"
            )
        parts: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        for name, array in self.tensors.items():
            if _PATCH_ROWS.fullmatch(name):
                bounds, unit = patch_bounds, "patches (image_grid_thw)"
            elif name in _TOKEN_ROWS:
                bounds, unit = token_bounds, "image tokens (visual_token_lens)"
            elif name in _IMAGE_ROWS:
                bounds, unit = image_bounds, "images"
            else:
                if keep_shared:
                    for part in parts:
                        part[name] = array
                continue
            rows = array.shape[0] if array.ndim else None
            if rows != bounds[-1]:
                raise ValueError(f"output {name!r} has {rows} rows but the request has {bounds[-1]} {unit}")
            for i in range(n):
                parts[i][name] = array[bounds[i] : bounds[i + 1]]
        return [
            Embeddings(
                tensors=parts[i],
                visual_token_lens=self.visual_token_lens[i : i + 1],
                image_grid_thw=self.image_grid_thw[i : i + 1],
                image_token_positions=(
                    positions[token_bounds[i] : token_bounds[i + 1]] if positions.size else positions
                ),
                sequence_length=self.sequence_length,
                request_id=self.request_id,
                timings=self.timings,
            )
            for i in range(n)
        ]

    @property
    def shared_outputs(self) -> tuple[str, ...]:
        """The outputs that mix all images of the request, which :meth:`split_by_image` cannot
        split (it leaves them out unless ``keep_shared=True``)."""
        return tuple(
            name
            for name in self.tensors
            if not (_PATCH_ROWS.fullmatch(name) or name in _TOKEN_ROWS or name in _IMAGE_ROWS)
        )

    # --- on disk -------------------------------------------------------------------------------

    def save(
        self,
        outdir: str | os.PathLike[str],
        extra_manifest: Mapping[str, Any] | None = None,
        *,
        image: str | os.PathLike[str] | None = None,
        prompt: str | None = None,
        model: str | None = None,
    ) -> Path:
        """Write every output as ``<outdir>/<name>.npy`` and describe them in ``manifest.json``.

        ``image`` (a path: stored absolute), ``prompt`` and ``model`` describe where the result
        came from (a result does not know it); given, they are stored in the manifest as
        ``"image"``, ``"prompt"``, ``"model"``. A save over an earlier one removes the ``.npy``
        files that the earlier manifest listed and this one does not. Files get the permissions
        of the umask, as ``open`` gives.

        ``visual_token_lens.npy`` and ``image_grid_thw.npy`` are written from the metadata when
        they are not among the outputs. bfloat16 arrays are saved upcast to float32 (exactly; plain
        numpy cannot load bfloat16 .npy files): their manifest entry keeps ``"dtype": "bfloat16"``
        and adds ``"saved_dtype": "float32"``. The manifest is::

            {"format_version": 1, "request_id": ..., "sequence_length": T,
             "visual_token_lens": [...], "image_grid_thw": [[t, h, w], ...],
             "files": {name: {"file": "<name>.npy", "shape": [...], "dtype": "float32"}, ...},
             **extra_manifest}

        with sorted keys. Every file is written to a temporary name and renamed into place, the
        manifest last, so a complete manifest means complete files.

        Returns:
            ``outdir`` as a Path (created if missing).

        Raises:
            ValueError: ``extra_manifest`` reuses a manifest key (or one of image, prompt, model
                that is also given as an argument), or an output name is not a safe file name.
            TypeError: ``extra_manifest`` is not JSON-serialisable.
        """
        described = {"image": None if image is None else os.path.abspath(image), "prompt": prompt, "model": model}
        return on_disk.save(self, outdir, extra_manifest, described)


def _int_array(value: object, name: str) -> npt.NDArray[np.int64]:
    array = np.asarray(value)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _read_only(array: np.ndarray) -> np.ndarray:
    # A view, so that the caller's own array stays writeable.
    view: np.ndarray = array.view()
    view.flags.writeable = False
    return view


def _bounds(counts: npt.NDArray[np.int64]) -> list[int]:
    """Start offsets of consecutive blocks of ``counts`` rows, then the total: ``[0, c0, c0+c1, ...]``."""
    return [0, *np.cumsum(counts, dtype=np.int64).tolist()]


def retrieval_vectors(result: Embeddings | Any) -> npt.NDArray[Any]:
    """The retrieval output (multi_vector or single_vector) of a result; raises the result itself
    when it is an error, ValueError when it has no retrieval output."""
    if isinstance(result, BaseException):
        raise result
    for name in RETRIEVAL_OUTPUTS:
        if name in result.tensors:
            vectors: npt.NDArray[Any] = result.tensors[name]
            return vectors
    raise ValueError(f"the result has no retrieval output ({', '.join(RETRIEVAL_OUTPUTS)}); got {list(result.tensors)}")
