"""Encoders returning {"P1".."P5"} feature dicts (stride 2^n)."""
