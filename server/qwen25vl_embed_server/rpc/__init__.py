"""The gRPC edge: protobuf in and out, status codes, security, observation, the server itself.

Depends on :mod:`qwen25vl_embed_server.core` and on the SDK package ``qwen25vl_embed`` (generated
messages and the tensor codec); never on the Ray or CLI rooms. ``calls`` holds the RPCs'
behaviour free of any call context; ``servicer`` adapts it to gRPC (the Ray replica adapts it to
Ray Serve).
"""
