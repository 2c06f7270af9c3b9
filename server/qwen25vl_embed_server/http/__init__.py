"""The HTTP/JSON edge: OpenAI- and Cohere-compatible routes beside gRPC, in the same process.

It runs requests through the same :class:`~qwen25vl_embed_server.core.scheduling.pipeline.Pipeline`
as the gRPC servicer (limits, budgets, batching), records into the same metrics and request log,
and takes the gRPC port's host, TLS and bearer tokens (``serve --http-port``).
"""
