"""``qwen25vl-embed``: the command line. Depends on every other room, importing torch (through the
core) only for the commands that run the model."""

from qwen25vl_embed_server.cli.app import main

__all__ = ["main"]
