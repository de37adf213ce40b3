"""Custom Keras layers, one family per file."""
