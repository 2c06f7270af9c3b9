"""The HTTP/JSON API against gRPC."""
