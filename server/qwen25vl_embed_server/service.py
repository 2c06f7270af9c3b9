"""The gRPC servicer: protobuf in, extraction core, protobuf out. Nothing model-specific here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import grpc
from PIL import Image

from qwen25vl_embed import codec
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc

from .decoding import decode_image
from .errors import InvalidInputError, ModelNotReadyError
from .extractor import Extractor
from .outputs import DEFAULT_OUTPUTS
from .preprocess import DEFAULT_PROMPT

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_REQUEST_ID_CHARS = 256


def server_version() -> str:
    try:
        return version("qwen25vl-embed")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class ServiceConfig:
    """``chunk_bytes``: the largest EmbeddingResponse the service sends."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    """Serves Extract and Info. The model runs on one dedicated thread that owns the device."""

    def __init__(self, config: ServiceConfig = ServiceConfig()) -> None:
        self._config = config
        self._extractor: Extractor | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def attach(self, extractor: Extractor) -> None:
        """Start serving with ``extractor`` (until then, calls get UNAVAILABLE)."""
        self._extractor = extractor

    def close(self) -> None:
        self._model_thread.shutdown(wait=True)

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            raise ModelNotReadyError("the model is still loading; retry later")
        return self._extractor

    async def Extract(  # noqa: N802 - the RPC's name
        self, request: pb.ImageRequest, context: grpc.aio.ServicerContext[pb.ImageRequest, pb.EmbeddingResponse]
    ) -> AsyncIterator[pb.EmbeddingResponse]:
        extractor = self.extractor
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidInputError(
                f"request_id is {len(request.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
            )
        dtype = _wire_dtype(request.dtype)
        plan = extractor.plan(list(request.outputs))
        if not request.images:
            raise InvalidInputError("the request has no image; send at least one")
        images = await asyncio.to_thread(_decode_all, list(request.images))
        prompt = request.prompt if request.HasField("prompt") else DEFAULT_PROMPT
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._model_thread, lambda: extractor.extract(images, prompt, plan, dtype, request.normalize)
        )
        yield pb.EmbeddingResponse(
            request_id=request.request_id,
            metadata=pb.ResponseMetadata(
                visual_token_lens=result.visual_token_lens.tolist(),
                image_grid_thw=[pb.ImageGrid(t=t, h=h, w=w) for t, h, w in result.image_grid_thw.tolist()],
                image_token_positions=result.image_token_positions.tolist(),
                sequence_length=result.sequence_length,
            ),
        )
        for parts in codec.pack(result.tensors, self._config.chunk_bytes):
            yield pb.EmbeddingResponse(request_id=request.request_id, tensors=parts)

    async def Info(  # noqa: N802 - the RPC's name
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[pb.InfoRequest, pb.InfoResponse]
    ) -> pb.InfoResponse:
        extractor = self.extractor
        loaded = extractor.loaded
        vision = loaded.model.config.vision_config
        size = loaded.processor.image_processor.size
        return pb.InfoResponse(
            model=loaded.name,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            vision_hidden_size=int(vision.hidden_size),
            hidden_size=int(loaded.model.config.text_config.hidden_size),
            patch_size=int(vision.patch_size),
            spatial_merge_size=int(vision.spatial_merge_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            outputs=list(extractor.outputs),
            default_outputs=list(DEFAULT_OUTPUTS),
            num_lm_layers=extractor.num_lm_layers,
            num_vision_layers=extractor.num_vision_layers,
            chunk_bytes=self._config.chunk_bytes,
            server_version=server_version(),
        )


def _wire_dtype(dtype: int) -> str:
    if dtype == pb.DTYPE_UNSPECIFIED:
        return "float32"
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        return codec.dtype_name(dtype)
    raise InvalidInputError(f"dtype {dtype} is not a floating-point wire dtype; use FLOAT32, FLOAT16 or BFLOAT16")


def _decode_all(images: list[pb.Image]) -> list[Image.Image]:
    return [decode_image(image.data, index) for index, image in enumerate(images)]
