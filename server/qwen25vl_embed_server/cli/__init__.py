from qwen25vl_embed_server.cli.app import main

__all__ = ["main"]
