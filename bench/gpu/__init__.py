"""The GPU benchmark: the throughput table with the Qwen2.5-VL-7B architecture, and the LM's TFLOP/s."""
