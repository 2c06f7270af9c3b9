"""The model: loading a checkpoint, preparing its inputs, running it and naming its outputs.

Loading (``loading``, ``hub``, ``load_report``, ``dtypes``), inputs (``image_formats``,
``image_decoding``, ``prompt``), outputs (``outputs``, ``capture``, ``window_order``), the
forwards (``extractor``, ``finishing``) and what callers may know of the model (``model_info``).
"""
