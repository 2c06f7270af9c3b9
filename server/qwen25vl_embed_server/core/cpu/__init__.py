"""CPU levers: kernels and settings that make the model faster on the CPU.

Each lever is one module (``packed_linear``, ``bf16_arithmetic``, ``vision_attention``,
``patch_embedding``, ``mkl_dispatch``); ``levers.apply`` installs them on a loaded model in the
order they need. ``mkl_dispatch`` runs before torch loads, so this package imports nothing when
it loads.
"""
