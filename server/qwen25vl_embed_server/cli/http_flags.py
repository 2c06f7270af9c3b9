"""``serve``'s flags of the HTTP/JSON API (their ranges are checked with the others':
:data:`~.flags.SERVE_FLAG_RANGES`)."""

from __future__ import annotations

import argparse

from qwen25vl_embed_server.http.config import DEFAULT_HTTP_VECTOR, DEFAULT_MAX_INPUTS, HTTP_VECTORS


def http_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "HTTP/JSON API (OpenAI /v1/embeddings, Cohere /v2/embed, /pooling) beside gRPC: same host, TLS and tokens"
    )
    group.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the HTTP/JSON API on this port (0: any free port; default: off)",
    )
    group.add_argument(
        "--http-vector",
        choices=HTTP_VECTORS,
        default=DEFAULT_HTTP_VECTOR,
        help="the pooled vector (L2-normalised) a checkpoint without a retrieval recipe answers with; "
        f"a retrieval checkpoint answers with its recipe's ({DEFAULT_HTTP_VECTOR})",
    )
    group.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the name clients give as 'model' and GET /v1/models lists (default: --model as given)",
    )
    group.add_argument(
        "--http-max-inputs",
        type=int,
        default=DEFAULT_MAX_INPUTS,
        help=f"texts or images per HTTP request, then 413 ({DEFAULT_MAX_INPUTS})",
    )
