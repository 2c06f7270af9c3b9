"""Generated protobuf and gRPC code for ``qwen25vl.embed.v1`` (``protos/``): ``embed_pb2`` (messages)
and ``embed_pb2_grpc`` (service stub). Written by the build (hatch-protobuf), never edited by hand.
"""
