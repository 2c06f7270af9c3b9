"""Throughput: the original one-file script's method against the extraction core and the service."""
