"""Side by side with peers: vLLM's CPU build on the same checkpoint and images."""
