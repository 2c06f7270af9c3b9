"""The extraction core: everything that runs the model, and nothing of any transport.

Imports no gRPC and no generated code, and no other room of this package (a test checks every
module). Its values are plain: numpy arrays, torch tensors, dataclasses. Read in this order:
``defaults`` and ``limits`` (settings), ``errors``, ``loading`` / ``tiny_model``,
``image_decoding``, ``prompt``, ``request`` (the one check-decode-prepare chain), ``outputs`` /
``capture`` / ``window_order``, ``extractor``, ``batcher``, ``pipeline``.
"""
