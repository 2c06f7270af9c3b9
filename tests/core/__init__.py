"""The extraction core: capture points and fidelity against transformers, batching, decoding, limits, pipeline."""
