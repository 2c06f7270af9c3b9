"""Retrieval recipes (ColQwen2.5, BiQwen2.5): the recipes, a checkpoint's layout, the base +
adapter + head model and the heads' vectors.
"""
