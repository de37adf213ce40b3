"""Fit wiring, callbacks, distribution strategy."""
