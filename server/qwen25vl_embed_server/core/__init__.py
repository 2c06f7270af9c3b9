"""The extraction core: everything that runs the model, and nothing of any transport.

Imports no gRPC and no generated code, and no other room of this package (a test checks every
module). Its values are plain: numpy arrays, torch tensors, dataclasses. Its rooms, in reading
order: ``defaults`` and ``errors`` (leaves every room reads); ``admission`` (limits, the one
check-decode-prepare chain, costs and budgets); ``model`` (loading, inputs, the extractor and its
outputs); ``scheduling`` (model thread, lanes, pieces, batcher, pipeline); ``cpu`` (the CPU levers
and the one order they are applied in); ``retrieval`` (ColQwen2.5 / BiQwen2.5); ``fixtures`` (the
offline checkpoints).
"""
