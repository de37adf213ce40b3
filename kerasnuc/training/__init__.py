"""Fit wiring (``trainer``), callbacks, checkpoints, validation with the real post-processing,
distribution strategy."""
