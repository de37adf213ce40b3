"""Keras 3 optimizers the papers need and Keras lacks."""
