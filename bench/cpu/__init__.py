"""The model on the CPU: its kernel levers, one at a time, how close it runs to the matmuls' floor,
and which of its outputs are bit-exact."""
