"""Scheduling: who runs what on the model, and when.

The model thread (``model_thread``), batches side by side on one model (``model_lanes``), large
requests in bounded pieces (``pieces``), dynamic batching (``batcher``) and the one request
pipeline in front of them (``pipeline``).
"""
