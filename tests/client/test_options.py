"""ExtractOptions and the Enums of the choices: one value per request, the proto's enums mirrored."""

from __future__ import annotations

from typing import Any

import pytest

from qwen25vl_embed import Arithmetic, ExtractOptions, PromptFormat, VectorEncoding
from qwen25vl_embed.options import merge
from qwen25vl_embed.requests import build_request, request_from_options
from qwen25vl_embed.v1 import embed_pb2 as pb


@pytest.mark.parametrize(
    ("choice", "proto", "prefix"),
    [(PromptFormat, pb.PromptFormat, "PROMPT_FORMAT_"), (VectorEncoding, pb.VectorEncoding, "VECTOR_ENCODING_")],
)
def test_each_choice_is_one_of_the_protos_enum(
    choice: type[PromptFormat] | type[VectorEncoding], proto: Any, prefix: str
) -> None:
    named = {name.removeprefix(prefix) for name in list(proto.keys())} - {"UNSPECIFIED"}
    assert {member.name for member in choice} == named
    for member in choice:
        assert member.proto == proto.Value(prefix + member.name)


def test_a_member_is_its_string() -> None:
    query: str = PromptFormat.QUERY  # a member is a str
    assert query == "query"
    assert f"{VectorEncoding.INT8}" == "int8"
    assert str(Arithmetic.EXACT) == "exact"
    assert PromptFormat("document") is PromptFormat.DOCUMENT


def test_options_build_the_request_the_arguments_do() -> None:
    options = ExtractOptions(prompt="a query", prompt_format=PromptFormat.QUERY, dimensions=64, vector_encoding="int8")
    assert request_from_options(None, options, "7") == build_request(
        None, "a query", request_id="7", prompt_format="query", dimensions=64, vector_encoding=VectorEncoding.INT8
    )


def test_a_keyword_given_overrides_its_field_and_none_keeps_it() -> None:
    options = ExtractOptions(dtype="bfloat16", dimensions=32)
    merged = merge(options, dtype=None, dimensions=64)
    assert (merged.dtype, merged.dimensions) == ("bfloat16", 64)
    assert merge(None) == ExtractOptions()


def test_an_unknown_choice_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        request_from_options(None, ExtractOptions(prompt="x", prompt_format="chatty"))
    with pytest.raises(ValueError, match="vector_encoding must be one of"):
        request_from_options(None, ExtractOptions(prompt="x", vector_encoding="int4"))


def test_the_servers_choices_are_the_sdks() -> None:
    """The extraction core names its choices in plain tuples (it imports no generated code); they
    are the SDK's Enums' values, in the same order, and the gRPC edge maps the proto through them."""
    from qwen25vl_embed_server.core.defaults import ARITHMETICS
    from qwen25vl_embed_server.core.model.prompt import PROMPT_FORMATS
    from qwen25vl_embed_server.core.retrieval.heads import VECTOR_ENCODINGS
    from qwen25vl_embed_server.rpc.messages import prompt_format

    assert tuple(member.value for member in PromptFormat) == PROMPT_FORMATS
    assert tuple(member.value for member in VectorEncoding) == VECTOR_ENCODINGS
    assert tuple(member.value for member in Arithmetic) == ARITHMETICS
    assert [prompt_format(member.proto) for member in PromptFormat] == list(PROMPT_FORMATS)
    assert prompt_format(pb.PROMPT_FORMAT_UNSPECIFIED) == PromptFormat.CHAT
