"""Ray: the Serve deployment (``deployment``) and its driver (``deploy``), and the Ray Data bulk job
(``bulk_job``, with ``bulk_listing``, ``bulk_actor`` and ``parquet_format``). The ``ray`` extra.

Depends on :mod:`qwen25vl_embed_server.core` and :mod:`qwen25vl_embed_server.rpc`; the CLI depends
on it, never the other way.
"""
