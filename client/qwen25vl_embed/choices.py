"""The named choices of a request and of a server, as Enums whose values are their wire names.

Each member is a ``str`` (``PromptFormat.QUERY == "query"``), so a plain string is accepted
wherever a member is. :class:`PromptFormat` and :class:`VectorEncoding` mirror the proto's enums
of the same names (``member.proto`` is its number there); :class:`Arithmetic` names the
values of ``ServerInfo.arithmetic``, a string in the proto.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from qwen25vl_embed.v1 import embed_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Arithmetic", "PromptFormat", "VectorEncoding"]


class _Choice(str, enum.Enum):
    """A str-valued choice; ``str()`` and ``format()`` give its value on every Python version."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls, value: str, field: str) -> Self:
        """The member named by ``value`` (a member or its string).

        Raises:
            ValueError: ``value`` names no member.
        """
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{field} must be one of {[m.value for m in cls]}, got {value!r}") from None


class PromptFormat(_Choice):
    """How the prompt becomes the model's input (the proto's PromptFormat)."""

    CHAT = "chat"
    """The chat template: the images, then the prompt (the default)."""
    RAW = "raw"
    """The prompt is the whole text, ``<image>`` where each image goes."""
    QUERY = "query"
    """The server's retrieval recipe, for a query (``ServerInfo.recipe``)."""
    DOCUMENT = "document"
    """The server's retrieval recipe, for a document."""

    @property
    def proto(self) -> pb.PromptFormat.ValueType:
        """The proto's ``PROMPT_FORMAT_<NAME>``."""
        return pb.PromptFormat.Value(f"PROMPT_FORMAT_{self.name}")


class VectorEncoding(_Choice):
    """The wire form of the retrieval outputs (the proto's VectorEncoding)."""

    FLOAT = "float"
    """Floating point, in the request's dtype (the default)."""
    INT8 = "int8"
    """int8, ``round(v * 127)``: 4x smaller."""
    BINARY = "binary"
    """Sign bits packed 8 per byte (uint8, ``numpy.packbits``): 32x smaller."""

    @property
    def proto(self) -> pb.VectorEncoding.ValueType:
        """The proto's ``VECTOR_ENCODING_<NAME>``."""
        return pb.VectorEncoding.Value(f"VECTOR_ENCODING_{self.name}")


class Arithmetic(_Choice):
    """How a server's model computes its dot products (``ServerInfo.arithmetic``)."""

    EXACT = "exact"
    """transformers' own kernels: its results, bit for bit."""
    FP32_ONEDNN = "fp32-onednn"
    """float32 through prepacked oneDNN weights: within float32 rounding."""
    BF16_FLOAT32 = "bf16-float32"
    """A bfloat16 model computed in float32 arithmetic: within bfloat16 rounding of the fp32 result."""
